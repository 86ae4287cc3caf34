//! The scenarios. Each uses its own agent label, so only its own agents
//! take its jobs, and leaves no queued job behind.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::sync::mpsc;
use yard_proto::v1 as pb;
use yard_proto::v1::agent_message::Msg as AgentMsg;

use crate::agents::{self, HeldEvent, Mode, Recorder};
use crate::pgfloor;
use crate::report::{Report, human};
use crate::stats::{Latency, now_ns};
use crate::ws::{self, Server, Sink};
use crate::{Ctx, Sizes};

fn rate(n: u64, elapsed: Duration) -> f64 {
    n as f64 / elapsed.as_secs_f64().max(1e-9)
}

async fn counters(ctx: &Ctx) -> Option<pgfloor::Counters> {
    match &ctx.pg {
        Some(client) => pgfloor::counters(client).await.ok(),
        None => None,
    }
}

fn per_job(
    before: Option<pgfloor::Counters>,
    after: Option<pgfloor::Counters>,
    jobs: u64,
) -> serde_json::Value {
    match (before, after) {
        (Some(b), Some(a)) => pgfloor::per_job(b, a, jobs),
        _ => json!({}),
    }
}

/// The floor on the same PostgreSQL, first, so every later row has an
/// in-run baseline.
pub async fn floor(ctx: &Ctx, sizes: &Sizes, report: &mut Report) -> anyhow::Result<()> {
    let Some(url) = &ctx.pg_url else {
        eprintln!("yard-bench: no --pg-url: skipping the PostgreSQL floor");
        return Ok(());
    };
    for clients in [1usize, 8, 32] {
        let r = pgfloor::insert_rate(url, clients, 1, sizes.floor_duration).await?;
        report.add_baseline(&format!("pg-insert-{clients}c"), r);
        report.push(
            "pg floor",
            &format!("1-row INSERT commits, {clients} clients"),
            r,
            "rows/s",
            format!("{} rows/s", human(r)),
            &[],
            json!({ "clients": clients }),
        );
    }
    let r = pgfloor::insert_rate(url, 4, 100, sizes.floor_duration).await?;
    report.add_baseline("pg-insert-100x4c", r);
    report.push(
        "pg floor",
        "100-row INSERT commits, 4 clients",
        r,
        "rows/s",
        format!("{} rows/s", human(r)),
        &[],
        json!({ "clients": 4, "rows_per_statement": 100 }),
    );
    let l = pgfloor::commit_latency(url, sizes.idle_samples.max(50)).await?;
    report.add_baseline("pg-commit-p50-ms", l.p50_ms);
    report.add_baseline("pg-commit-p99-ms", l.p99_ms);
    report.push(
        "pg floor",
        "one durable commit, 1 client",
        l.p50_ms,
        "ms p50",
        l.short(),
        &[],
        json!(l),
    );
    pgfloor::drop_table(url).await?;
    Ok(())
}

/// Drains jobs with `label` through fresh agents (untimed clean-up).
async fn drain(ctx: &Ctx, label: &str, jobs: u64, timeout: Duration) -> anyhow::Result<u64> {
    if jobs == 0 {
        return Ok(0);
    }
    let recorder = Arc::new(Recorder::default());
    let sessions = agents::fleet(
        &ctx.api.org(label),
        &ctx.grpc,
        label,
        4,
        512,
        Mode::Complete,
        recorder.clone(),
    )
    .await?;
    let done = recorder.wait_completed(jobs, timeout).await;
    drop(sessions);
    Ok(done)
}

/// Single-job requests from 1/8/32 clients, then batch requests.
pub async fn enqueue(ctx: &Ctx, sizes: &Sizes, report: &mut Report) -> anyhow::Result<()> {
    let label = "bench-enqueue";
    let mut total = 0u64;
    for &(clients, batch) in &sizes.enqueue_cases {
        let cap = sizes.enqueue_max_jobs;
        let stop = Arc::new(AtomicBool::new(false));
        let created = Arc::new(AtomicU64::new(0));
        let before = counters(ctx).await;
        let started = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..clients {
            let api = ctx.api.org(label);
            let stop = stop.clone();
            let created = created.clone();
            tasks.push(tokio::spawn(async move {
                let mut latencies = Vec::new();
                while !stop.load(Ordering::Relaxed) && created.load(Ordering::Relaxed) < cap {
                    let t0 = now_ns();
                    if batch == 1 {
                        api.create_job(label).await?;
                    } else {
                        api.create_batch(label, batch).await?;
                    }
                    latencies.push(now_ns() - t0);
                    created.fetch_add(batch as u64, Ordering::Relaxed);
                }
                anyhow::Ok(latencies)
            }));
        }
        let deadline = Instant::now() + sizes.enqueue_duration;
        while Instant::now() < deadline && tasks.iter().any(|t| !t.is_finished()) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        stop.store(true, Ordering::Relaxed);
        let mut latencies = Vec::new();
        for t in tasks {
            latencies.extend(t.await??);
        }
        let elapsed = started.elapsed();
        let n = created.load(Ordering::Relaxed);
        total += n;
        let after = counters(ctx).await;
        let jps = rate(n, elapsed);
        let lat = Latency::from_ns(&latencies);
        let case = if batch == 1 {
            format!("1 job/request, {clients} clients")
        } else {
            format!("{batch} jobs/request, {clients} clients")
        };
        let baselines: Vec<String> = if batch == 1 {
            vec![format!("pg-insert-{clients}c")]
        } else {
            vec!["pg-insert-100x4c".into()]
        };
        let baselines: Vec<&str> = baselines.iter().map(String::as_str).collect();
        let mut detail = json!({ "clients": clients, "jobs_per_request": batch, "jobs": n, "seconds": elapsed.as_secs_f64(), "request_latency": lat });
        detail["db"] = per_job(before, after, n);
        report.push(
            "enqueue",
            &case,
            jps,
            "jobs/s",
            format!("{} jobs/s (request {})", human(jps), lat.short()),
            &baselines,
            detail,
        );
    }
    let drained = drain(ctx, label, total, sizes.drain_timeout).await?;
    if drained < total {
        report.failures.push(format!(
            "enqueue: only {drained} of {total} enqueued jobs drained"
        ));
    }
    Ok(())
}

/// Enqueues `n` jobs in batches of `batch` from `producers` clients.
async fn enqueue_batches(
    ctx: &Ctx,
    label: &'static str,
    n: u64,
    batch: usize,
    producers: usize,
) -> anyhow::Result<f64> {
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..producers {
        let api = ctx.api.org(label);
        let next = next.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                let from = next.fetch_add(batch as u64, Ordering::Relaxed);
                if from >= n {
                    return anyhow::Ok(());
                }
                api.create_batch(label, (n - from).min(batch as u64) as usize)
                    .await?;
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(rate(n, started.elapsed()))
}

/// N pre-enqueued no-op jobs through K agents: completed jobs/s.
pub async fn burndown(ctx: &Ctx, sizes: &Sizes, report: &mut Report) -> anyhow::Result<f64> {
    let label = "bench-burndown";
    let n = sizes.burndown_n;
    let enqueue_rate = enqueue_batches(ctx, label, n, 1000, 4).await?;
    let recorder = Arc::new(Recorder::default());
    let before = counters(ctx).await;
    let started = Instant::now();
    let sessions = agents::fleet(
        &ctx.api.org(label),
        &ctx.grpc,
        label,
        sizes.agents,
        sizes.capacity,
        Mode::Complete,
        recorder.clone(),
    )
    .await?;
    let done = recorder.wait_completed(n, sizes.burndown_timeout).await;
    let elapsed = started.elapsed();
    let after = counters(ctx).await;
    drop(sessions);
    let jps = rate(done, elapsed);
    let mut detail = json!({
        "n": n, "completed": done, "seconds": elapsed.as_secs_f64(), "agents": sizes.agents,
        "capacity": sizes.capacity, "enqueue_jobs_per_s": enqueue_rate.round(),
        "stale": recorder.stale.load(Ordering::Relaxed), "errors": recorder.errors.load(Ordering::Relaxed),
    });
    detail["db"] = per_job(before, after, done);
    if done < n {
        report.failures.push(format!(
            "burndown: {done} of {n} jobs completed within {:?}",
            sizes.burndown_timeout
        ));
        drain(ctx, label, n - done, sizes.drain_timeout).await?;
    }
    report.push(
        "burn-down",
        &format!(
            "N = {n}, {} agents × capacity {}",
            sizes.agents, sizes.capacity
        ),
        jps,
        "jobs/s",
        format!(
            "{} jobs/s ({done} jobs in {:.1} s; enqueue {} jobs/s)",
            human(jps),
            elapsed.as_secs_f64(),
            human(enqueue_rate)
        ),
        &["raw-pg/drain-batch", "pg-insert-100x4c"],
        detail,
    );
    Ok(jps)
}

/// The configured fleet of agents in `label`'s org that complete every job
/// at once, and the recorder of what they saw.
async fn completing_fleet(
    ctx: &Ctx,
    sizes: &Sizes,
    label: &str,
) -> anyhow::Result<(Arc<Recorder>, Vec<agents::Session>)> {
    let recorder = Arc::new(Recorder::default());
    let sessions = agents::fleet(
        &ctx.api.org(label),
        &ctx.grpc,
        label,
        sizes.agents,
        sizes.capacity,
        Mode::Complete,
        recorder.clone(),
    )
    .await?;
    Ok((recorder, sessions))
}

/// Full lifecycle: batch enqueue through REST while agents take and complete.
pub async fn lifecycle(ctx: &Ctx, sizes: &Sizes, report: &mut Report) -> anyhow::Result<()> {
    let label = "bench-lifecycle";
    let n = sizes.lifecycle_n;
    let (recorder, sessions) = completing_fleet(ctx, sizes, label).await?;
    let before = counters(ctx).await;
    let started = Instant::now();
    let enqueue_rate = enqueue_batches(ctx, label, n, 100, 4).await?;
    let done = recorder.wait_completed(n, sizes.burndown_timeout).await;
    let elapsed = started.elapsed();
    let after = counters(ctx).await;
    drop(sessions);
    let (to_assigned, to_completed) = recorder.take_samples();
    let (a, c) = (
        Latency::from_ns(&to_assigned),
        Latency::from_ns(&to_completed),
    );
    let jps = rate(done, elapsed);
    let mut detail = json!({ "n": n, "completed": done, "seconds": elapsed.as_secs_f64(), "enqueue_jobs_per_s": enqueue_rate.round(),
        "created_to_assigned": a, "created_to_completed": c, "stale": recorder.stale.load(Ordering::Relaxed) });
    detail["db"] = per_job(before, after, done);
    if done < n {
        report
            .failures
            .push(format!("lifecycle: {done} of {n} jobs completed"));
        drain(ctx, label, n - done, sizes.drain_timeout).await?;
    }
    report.push(
        "lifecycle",
        &format!("N = {n}, REST batches of 100, {} agents", sizes.agents),
        jps,
        "jobs/s",
        format!("{} jobs/s (created→completed {})", human(jps), c.short()),
        &["raw-pg/lifecycle-batch", "pg-insert-100x4c"],
        detail,
    );
    Ok(())
}

/// Idle single-job dispatch: created through REST → assignment received.
pub async fn idle(ctx: &Ctx, sizes: &Sizes, report: &mut Report) -> anyhow::Result<Latency> {
    let label = "bench-idle";
    let recorder = Arc::new(Recorder::default());
    let sessions = agents::fleet(
        &ctx.api.org(label),
        &ctx.grpc,
        label,
        1,
        1,
        Mode::Complete,
        recorder.clone(),
    )
    .await?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let warmup = 10u64;
    let total = warmup + sizes.idle_samples as u64;
    let (gap_min, gap_max) = sizes.idle_gap_ms;
    // How much of the path is the REST request itself (insert, commit,
    // wake-up published, answer read).
    let mut answered = Vec::with_capacity(sizes.idle_samples);
    for i in 0..total {
        let gap = gap_min + (now_ns() % (gap_max - gap_min + 1));
        tokio::time::sleep(Duration::from_millis(gap)).await;
        let sent = now_ns();
        ctx.api.org(label).create_job(label).await?;
        if i >= warmup {
            answered.push(now_ns().saturating_sub(sent));
        }
        // One at a time: the next is added after this one is done.
        let got = recorder
            .wait_completed(i + 1, Duration::from_secs(10))
            .await;
        anyhow::ensure!(got > i, "idle: job {i} not completed within 10 s");
        if i + 1 == warmup {
            recorder.take_samples();
        }
    }
    drop(sessions);
    let (to_assigned, to_completed) = recorder.take_samples();
    let a = Latency::from_ns(&to_assigned);
    let c = Latency::from_ns(&to_completed);
    let rest = Latency::from_ns(&answered);
    report.push(
        "idle dispatch",
        "created (REST) → assignment received, p50",
        a.p50_ms,
        "ms",
        format!(
            "{} (REST answered {}; created→completed {})",
            a.short(),
            rest.short(),
            c.short()
        ),
        &["graphile-idle-p50-ms", "pg-commit-p50-ms"],
        json!({ "to_assigned": a, "to_completed": c, "rest_answered": rest, "gap_ms": [gap_min, gap_max] }),
    );
    report.push(
        "idle dispatch",
        "created (REST) → assignment received, p99",
        a.p99_ms,
        "ms",
        format!("p99 {:.1} ms", a.p99_ms),
        &["graphile-idle-p99-ms", "pg-commit-p99-ms"],
        json!({}),
    );
    Ok(a)
}

/// Open-loop load at fixed rates of single-job REST creates.
pub async fn steady(ctx: &Ctx, sizes: &Sizes, report: &mut Report) -> anyhow::Result<()> {
    let label = "bench-steady";
    let (recorder, sessions) = completing_fleet(ctx, sizes, label).await?;
    let mut expected = 0u64;
    for &target in &sizes.steady_rates {
        let semaphore = Arc::new(tokio::sync::Semaphore::new(512));
        let created = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let interval = Duration::from_secs_f64(1.0 / target as f64);
        let count = (target as f64 * sizes.steady_duration.as_secs_f64()) as u64;
        let started = tokio::time::Instant::now();
        let mut tasks = Vec::with_capacity(count as usize);
        for i in 0..count {
            tokio::time::sleep_until(started + interval.mul_f64(i as f64)).await;
            let Ok(permit) = semaphore.clone().acquire_owned().await else {
                break;
            };
            let api = ctx.api.org(label);
            let created = created.clone();
            let failed = failed.clone();
            tasks.push(tokio::spawn(async move {
                match api.create_job(label).await {
                    Ok(_) => created.fetch_add(1, Ordering::Relaxed),
                    Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                };
                drop(permit);
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
        let offered_for = started.elapsed();
        let made = created.load(Ordering::Relaxed);
        expected += made;
        let done = recorder
            .wait_completed(expected, Duration::from_secs(60))
            .await;
        let (to_assigned, to_completed) = recorder.take_samples();
        let (a, c) = (
            Latency::from_ns(&to_assigned),
            Latency::from_ns(&to_completed),
        );
        let achieved = rate(made, offered_for);
        report.push("steady", &format!("{target} jobs/s: created → completed p99"), c.p99_ms, "ms",
            format!("achieved {} jobs/s; →assigned {}; →completed {}", human(achieved), a.short(), c.short()),
            &["target-steady-p99-ms"],
            json!({ "offered_per_s": target, "achieved_per_s": achieved, "created": made, "failed": failed.load(Ordering::Relaxed),
                    "completed_total": done, "to_assigned": a, "to_completed": c }));
        if done < expected {
            report.failures.push(format!(
                "steady {target}/s: {done} of {expected} jobs completed"
            ));
            drop(sessions);
            // Leftovers would sit at the head of the org's queue and block later scenarios.
            drain(ctx, label, expected - done, sizes.drain_timeout).await?;
            return Ok(());
        }
    }
    drop(sessions);
    Ok(())
}

/// One held job whose agent session the scenario drives.
struct HeldJob {
    job_id: String,
    epoch: u64,
    outbound: mpsc::Sender<pb::AgentMessage>,
    events: mpsc::UnboundedReceiver<HeldEvent>,
    offset: u64,
    line_no: u64,
    _sessions: Vec<agents::Session>,
}

impl HeldJob {
    async fn start(ctx: &Ctx, label: &str) -> anyhow::Result<Self> {
        let (tx, mut events) = mpsc::unbounded_channel();
        let recorder = Arc::new(Recorder::default());
        let sessions = agents::fleet(
            &ctx.api.org(label),
            &ctx.grpc,
            label,
            1,
            1,
            Mode::Hold(tx),
            recorder,
        )
        .await?;
        ctx.api.org(label).create_job(label).await?;
        let assigned = tokio::time::timeout(Duration::from_secs(10), async {
            while let Some(e) = events.recv().await {
                if let HeldEvent::Assigned {
                    job_id,
                    epoch,
                    outbound,
                } = e
                {
                    return Some((job_id, epoch, outbound));
                }
            }
            None
        })
        .await?;
        let (job_id, epoch, outbound) =
            assigned.ok_or_else(|| anyhow::anyhow!("no assignment for the log job"))?;
        Ok(Self {
            job_id,
            epoch,
            outbound,
            events,
            offset: 0,
            line_no: 0,
            _sessions: sessions,
        })
    }

    /// Sends one chunk of `lines` stamped lines; returns its end offset.
    async fn send_chunk(&mut self, lines: usize) -> anyhow::Result<u64> {
        let sent = now_ns();
        let mut data = String::with_capacity(lines * 90);
        for _ in 0..lines {
            data.push_str(&ws::stamped_line(sent, self.line_no));
            data.push('\n');
            self.line_no += 1;
        }
        let chunk = pb::LogChunk {
            job_id: self.job_id.clone(),
            epoch: self.epoch,
            stream: pb::LogStream::Stdout as i32,
            offset: self.offset,
            data: data.into_bytes(),
            trace: None,
        };
        self.offset += chunk.data.len() as u64;
        self.outbound
            .send(pb::AgentMessage {
                msg: Some(AgentMsg::LogChunk(chunk)),
            })
            .await
            .map_err(|_| anyhow::anyhow!("the log agent's session ended"))?;
        Ok(self.offset)
    }

    /// Waits for the gateway to acknowledge up to `offset` (or `timeout`).
    async fn committed(&mut self, offset: u64, timeout: Duration) -> u64 {
        let mut committed = 0;
        let _ = tokio::time::timeout(timeout, async {
            while let Some(e) = self.events.recv().await {
                if let HeldEvent::LogAck { committed: c } = e {
                    committed = committed.max(c);
                    if committed >= offset {
                        return;
                    }
                }
            }
        })
        .await;
        committed
    }

    async fn finish(mut self) -> anyhow::Result<()> {
        let result = pb::JobResult {
            job_id: self.job_id.clone(),
            epoch: self.epoch,
            outcome: pb::Outcome::Succeeded as i32,
            exit_code: Some(0),
            error_kind: String::new(),
            message: String::new(),
            trace: None,
        };
        self.outbound
            .send(pb::AgentMessage {
                msg: Some(AgentMsg::Result(result)),
            })
            .await?;
        let _ = tokio::time::timeout(Duration::from_secs(10), async {
            while let Some(e) = self.events.recv().await {
                if matches!(e, HeldEvent::ResultAck) {
                    return;
                }
            }
        })
        .await;
        Ok(())
    }
}

async fn subscribe_all(
    server: Server,
    url: &str,
    channel: Option<String>,
    count: usize,
) -> anyhow::Result<(Arc<Sink>, Vec<tokio::task::JoinHandle<anyhow::Result<()>>>)> {
    let sink = Arc::new(Sink::default());
    let mut tasks = Vec::with_capacity(count);
    for _ in 0..count {
        tasks.push(ws::subscriber(
            server,
            url.to_owned(),
            channel.clone(),
            sink.clone(),
        ));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while (sink.ready.load(Ordering::Relaxed) as usize) < count {
        if let Some(done) = tasks.iter().position(|t| t.is_finished()) {
            let t = tasks.swap_remove(done);
            t.await??;
            anyhow::bail!("a subscriber ended before subscribing");
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "only {} of {count} subscribers ready after 30 s",
            sink.ready.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok((sink, tasks))
}

/// Agent → gateway → PostgreSQL → Redis → broadcaster → WebSocket subscribers.
pub async fn logs(ctx: &Ctx, sizes: &Sizes, report: &mut Report) -> anyhow::Result<()> {
    let mut job = HeldJob::start(ctx, "bench-logs").await?;
    let url = ws::url_for(Server::Switchyard, &ctx.ws, &ctx.token);
    let subscribers = sizes.log_subscribers;
    let (sink, tasks) = subscribe_all(
        Server::Switchyard,
        &url,
        Some(format!("job:{}", job.job_id)),
        subscribers,
    )
    .await?;

    // Throughput: chunks of 1,000 lines, up to 4 unacknowledged.
    let lines_per_chunk = 1000usize;
    let window = 4usize;
    let mut in_flight = std::collections::VecDeque::new();
    let lines0 = sink.lines.load(Ordering::Relaxed);
    let started = Instant::now();
    let mut sent_lines = 0u64;
    while started.elapsed() < sizes.log_duration {
        let end = job.send_chunk(lines_per_chunk).await?;
        sent_lines += lines_per_chunk as u64;
        in_flight.push_back(end);
        if in_flight.len() >= window {
            let oldest = in_flight.pop_front().unwrap_or(end);
            job.committed(oldest, Duration::from_secs(30)).await;
        }
    }
    let last = job.offset;
    let committed = job.committed(last, Duration::from_secs(60)).await;
    let stored_for = started.elapsed();
    // Let the subscribers catch up (bounded).
    let expected = lines0 + sent_lines * subscribers as u64;
    let catch_up = Instant::now();
    while sink.lines.load(Ordering::Relaxed) < expected
        && catch_up.elapsed() < Duration::from_secs(30)
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let delivered_for = started.elapsed();
    let delivered = sink.lines.load(Ordering::Relaxed) - lines0;
    let stored_rate = rate(sent_lines, stored_for);
    report.push("logs", &format!("max rate, 1 agent → {subscribers} WS subscribers"), stored_rate, "lines/s",
        format!("{} lines/s stored; {} line deliveries/s to subscribers ({:.1}% delivered)",
            human(stored_rate), human(rate(delivered, delivered_for)), delivered as f64 * 100.0 / (sent_lines * subscribers as u64).max(1) as f64),
        &["target-log-lines-per-s"],
        json!({ "lines_sent": sent_lines, "committed_offset": committed, "seconds_to_store": stored_for.as_secs_f64(),
                "deliveries": delivered, "seconds_to_deliver": delivered_for.as_secs_f64(), "subscribers": subscribers }));

    // Latency at a fixed rate: 100-line chunks every 10 ms (10,000 lines/s full size).
    let per_tick = (sizes.log_latency_rate / 100).max(1) as usize;
    sink.take_latencies();
    sink.recording.store(true, Ordering::Relaxed);
    let lines1 = sink.lines.load(Ordering::Relaxed);
    let started = tokio::time::Instant::now();
    let mut tick = 0u32;
    let mut sent = 0u64;
    while started.elapsed() < sizes.log_duration {
        tokio::time::sleep_until(started + Duration::from_millis(10) * tick).await;
        job.send_chunk(per_tick).await?;
        sent += per_tick as u64;
        tick += 1;
    }
    let last = job.offset;
    job.committed(last, Duration::from_secs(30)).await;
    let expected = lines1 + sent * subscribers as u64;
    let catch_up = Instant::now();
    while sink.lines.load(Ordering::Relaxed) < expected
        && catch_up.elapsed() < Duration::from_secs(10)
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    sink.recording.store(false, Ordering::Relaxed);
    let latency = Latency::from_ns(&sink.take_latencies());
    let delivered = sink.lines.load(Ordering::Relaxed) - lines1;
    report.push("logs", &format!("{} lines/s, agent → browser p99", human(rate(sent, sizes.log_duration))), latency.p99_ms, "ms",
        format!("{} ({:.1}% of {} line deliveries)", latency.short(), delivered as f64 * 100.0 / (sent * subscribers as u64).max(1) as f64, sent * subscribers as u64),
        &["target-log-p99-ms"], json!({ "latency": latency, "lines_sent": sent, "deliveries": delivered, "subscribers": subscribers }));
    job.finish().await?;
    for t in tasks {
        t.abort();
    }
    Ok(())
}

/// Idle connections held by one broadcaster, and its memory per connection.
pub async fn ws_idle(ctx: &Ctx, sizes: &Sizes, report: &mut Report) -> anyhow::Result<()> {
    let Some(pid) = ctx.broadcaster_pid else {
        eprintln!("yard-bench: no --broadcaster-pid: skipping idle WebSocket memory");
        return Ok(());
    };
    let url = ws::url_for(Server::Switchyard, &ctx.ws, &ctx.token);
    let before = ws::rss_kib(pid).unwrap_or(0);
    let started = Instant::now();
    let (tasks, held, error) =
        ws::idle_connections(Server::Switchyard, &url, sizes.idle_connections, 64).await;
    let connect_for = started.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Still there after settling?
    let still = tasks.iter().filter(|t| !t.is_finished()).count();
    let after = ws::rss_kib(pid).unwrap_or(0);
    let per_conn = (after.saturating_sub(before)) as f64 / held.max(1) as f64;
    for t in &tasks {
        t.abort();
    }
    report.push("websocket", &format!("{} idle connections held", sizes.idle_connections), per_conn, "KiB/conn",
        format!("{still} held; {:.1} KiB each (RSS {} → {} MiB); connected in {:.1} s", per_conn, before / 1024, after / 1024, connect_for.as_secs_f64()),
        &["target-ws-kib-per-conn"],
        json!({ "requested": sizes.idle_connections, "connected": held, "held_after_2s": still, "rss_before_kib": before, "rss_after_kib": after,
                "kib_per_connection": per_conn, "first_error": error }));
    drop(tasks);
    tokio::time::sleep(Duration::from_secs(1)).await;
    Ok(())
}

/// The best fan-out rate with p99 ≤ 100 ms over a rising sweep.
struct Sweep {
    best_deliveries: f64,
    best_p99: f64,
    steps: Vec<serde_json::Value>,
}

/// Publishes `frames/s` frames of `lines` lines for `duration`, via `publish`.
async fn sweep<F, Fut>(
    sink: &Sink,
    subscribers: usize,
    sizes: &Sizes,
    mut publish: F,
) -> anyhow::Result<Sweep>
where
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let lines = sizes.fanout_lines_per_frame;
    let mut result = Sweep {
        best_deliveries: 0.0,
        best_p99: 0.0,
        steps: vec![],
    };
    for &frames_per_s in &sizes.fanout_frame_rates {
        sink.take_latencies();
        sink.recording.store(true, Ordering::Relaxed);
        let l0 = sink.lines.load(Ordering::Relaxed);
        let interval = Duration::from_secs_f64(1.0 / frames_per_s as f64);
        let count = (frames_per_s as f64 * sizes.fanout_step.as_secs_f64()) as u32;
        let started = tokio::time::Instant::now();
        for i in 0..count {
            tokio::time::sleep_until(started + interval * i).await;
            publish(lines).await?;
        }
        let expected = l0 + count as u64 * lines as u64 * subscribers as u64;
        let wait = Instant::now();
        while sink.lines.load(Ordering::Relaxed) < expected
            && wait.elapsed() < Duration::from_secs(5)
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        sink.recording.store(false, Ordering::Relaxed);
        let elapsed = started.elapsed();
        let delivered = sink.lines.load(Ordering::Relaxed) - l0;
        let latency = Latency::from_ns(&sink.take_latencies());
        let deliveries = rate(delivered, elapsed);
        let complete = delivered + delivered / 100 >= expected - l0;
        result.steps.push(json!({ "frames_per_s": frames_per_s, "lines_per_frame": lines, "deliveries_per_s": deliveries.round(),
            "delivered_fraction": delivered as f64 / (expected - l0).max(1) as f64, "latency": latency }));
        eprintln!(
            "yard-bench:   {frames_per_s} frames/s × {lines} lines × {subscribers} subscribers: {} line deliveries/s, {}",
            human(deliveries),
            latency.short()
        );
        if !complete || latency.p99_ms > 100.0 {
            break;
        }
        result.best_deliveries = deliveries;
        result.best_p99 = latency.p99_ms;
    }
    Ok(result)
}

/// Fan-out: one publisher, many subscribers on one channel, rising rate;
/// the same against socket.io with the Redis adapter when it is given.
pub async fn fanout(ctx: &Ctx, sizes: &Sizes, report: &mut Report) -> anyhow::Result<()> {
    let subscribers = sizes.fanout_subscribers;
    let switchyard = {
        let job = HeldJob::start(ctx, "bench-fanout").await?;
        let url = ws::url_for(Server::Switchyard, &ctx.ws, &ctx.token);
        let (sink, tasks) = subscribe_all(
            Server::Switchyard,
            &url,
            Some(format!("job:{}", job.job_id)),
            subscribers,
        )
        .await?;
        let job = Arc::new(tokio::sync::Mutex::new(job));
        let s = sweep(&sink, subscribers, sizes, |lines| {
            let job = job.clone();
            async move {
                job.lock().await.send_chunk(lines).await?;
                Ok(())
            }
        })
        .await?;
        for t in tasks {
            t.abort();
        }
        if let Ok(job) = Arc::try_unwrap(job) {
            job.into_inner().finish().await?;
        }
        s
    };
    if let Some(sio) = &ctx.socketio {
        let url = ws::url_for(Server::SocketIo, &sio.ws, "");
        let (sink, tasks) = subscribe_all(Server::SocketIo, &url, None, subscribers).await?;
        let http = reqwest::Client::new();
        let mut line_no = 0u64;
        let s = sweep(&sink, subscribers, sizes, |lines| {
            let sent = now_ns();
            let batch: Vec<serde_json::Value> = (0..lines)
                .map(|_| {
                    line_no += 1;
                    json!({ "seq": line_no, "stream": "stdout", "line": ws::stamped_line(sent, line_no) })
                })
                .collect();
            let request = http.post(&sio.publish).json(&json!({ "lines": batch })).send();
            async move {
                request.await?.error_for_status()?;
                Ok(())
            }
        })
        .await?;
        for t in tasks {
            t.abort();
        }
        report.add_baseline("socketio-fanout", s.best_deliveries);
        report.push(
            "fan-out",
            &format!("socket.io + redis-adapter, {subscribers} subscribers, p99 ≤ 100 ms"),
            s.best_deliveries,
            "deliveries/s",
            format!(
                "{} line deliveries/s (p99 {:.1} ms)",
                human(s.best_deliveries),
                s.best_p99
            ),
            &[],
            json!({ "steps": s.steps }),
        );
    }
    {
        let s = switchyard;
        report.push(
            "fan-out",
            &format!("Switchyard broadcaster, {subscribers} subscribers, p99 ≤ 100 ms"),
            s.best_deliveries,
            "deliveries/s",
            format!(
                "{} line deliveries/s (p99 {:.1} ms)",
                human(s.best_deliveries),
                s.best_p99
            ),
            &["socketio-fanout"],
            json!({ "steps": s.steps }),
        );
    }
    Ok(())
}
