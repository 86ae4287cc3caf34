//! The scheduling loop: sweep when due, dispatch on every wake-up, sleep
//! until the next wake-up, sweep or due `run_at`.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bus::{Bus, Channel};
use chrono::Utc;
use db::dispatch::{DispatchSettings, Granted};
use db::leases::{Ending, Timeout};
use db::{Db, DbError};
use domain::events::{Envelope, Event};
use domain::job::JobStatus;
use domain::retry::InfraReason;
use domain::{AgentId, JobId, OrgId};
use futures_util::StreamExt;
use prometheus::Registry;
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::Settings;
use crate::metrics::Metrics;

/// Most rows one sweep query handles; the rest wait for the next sweep.
const SWEEP_BATCH: i64 = 500;
/// How long to wait before dispatching an org again whose lock was held:
/// about as long as a create that leases its own job holds it.
const CONTENDED_RETRY: Duration = Duration::from_millis(2);
/// How many dispatches' offers may be on their way to Redis while the
/// next dispatch runs; a dispatch finding them all in flight waits.
const OFFERS_IN_FLIGHT: u32 = 4;
/// From this many leases in one dispatch, their offers are published off
/// the dispatch loop even when the org has nothing more to lease: agents
/// freeing capacity while they are built would otherwise wait for them.
const OFFERS_PUBLISHED_ASIDE_FROM: usize = 64;
/// How long a stopping engine waits for offers still in flight.
const OFFERS_DRAIN_ON_STOP: Duration = Duration::from_secs(5);
/// Idempotency keys are kept this long.
const IDEMPOTENCY_KEY_HOURS: i64 = 24;

/// One scheduler replica's engine.
#[derive(Clone)]
pub struct Engine {
    db: Db,
    bus: Bus,
    settings: Settings,
    dispatch: DispatchSettings,
    metrics: Metrics,
    /// When the queue-depth gauge was last recounted.
    depth_counted_at: Arc<Mutex<Option<Instant>>>,
    /// Permits for publishing offers off the dispatch loop.
    offers_in_flight: Arc<Semaphore>,
}

/// What a tick did, for tests and logs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TickReport {
    pub leased: usize,
    pub expired: usize,
    pub timed_out: usize,
    /// An org could lease more at once (see `Dispatched::more`): run again.
    pub saturated: bool,
    /// Orgs whose dispatch lock another transaction held (see
    /// `Dispatched::contended`): look at them again shortly.
    pub contended: Vec<OrgId>,
}

impl Engine {
    pub fn new(db: Db, bus: Bus, settings: Settings, registry: &Registry) -> Self {
        let dispatch = DispatchSettings {
            ack_timeout: settings.ack_timeout,
            aging: settings.aging,
            max_leases_per_tick: settings.max_leases_per_tick,
            ..DispatchSettings::default()
        };
        Self {
            db,
            bus,
            settings,
            dispatch,
            metrics: Metrics::new(registry),
            depth_counted_at: Arc::default(),
            offers_in_flight: Arc::new(Semaphore::new(OFFERS_IN_FLIGHT as usize)),
        }
    }

    /// Runs until `shutdown`; a tick in progress completes first.
    pub async fn run(self, shutdown: CancellationToken) {
        let wakeups = Arc::new(Wakeups::default());
        tokio::spawn(listen_for_wakeups(
            self.bus.clone(),
            wakeups.clone(),
            shutdown.clone(),
        ));
        let mut next_sweep = Instant::now();
        loop {
            if shutdown.is_cancelled() {
                break;
            }
            let sweep_now = Instant::now() >= next_sweep;
            if sweep_now {
                next_sweep = Instant::now() + self.settings.sweep_interval;
            }
            let woken = wakeups.take();
            let report = match self.tick_orgs(sweep_now, woken).await {
                Ok(report) => report,
                Err(error) => {
                    tracing::warn!(error = %error, "scheduler tick failed; retrying shortly");
                    wakeups.include_all();
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(Duration::from_millis(500)) => continue,
                    }
                }
            };
            if report.saturated {
                wakeups.include_all();
                continue;
            }
            if !report.contended.is_empty() {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(CONTENDED_RETRY) => {}
                }
                for org in report.contended {
                    wakeups.include(org);
                }
                continue;
            }
            let until_sweep = next_sweep.saturating_duration_since(Instant::now());
            let until_due = self.until_next_run_at().await.unwrap_or(until_sweep);
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = wakeups.notify.notified() => {}
                // Jobs that came due may be in any org.
                _ = tokio::time::sleep(until_sweep.min(until_due)) => wakeups.include_all(),
            }
        }
        // Offers still on their way go out before the engine reports
        // stopped, unless Redis holds them up (their leases then lapse).
        let _ = tokio::time::timeout(
            OFFERS_DRAIN_ON_STOP,
            self.offers_in_flight.acquire_many(OFFERS_IN_FLIGHT),
        )
        .await;
        tracing::info!("scheduler engine stopped");
    }

    /// One pass: the sweep (when asked) and a dispatch of every org with work.
    pub async fn tick(&self, sweep: bool) -> Result<TickReport, DbError> {
        self.tick_orgs(sweep, None).await
    }

    /// [`tick`](Self::tick), dispatching only `woken` when it names the orgs
    /// whose wake-ups started this pass (and no sweep ran, which may have
    /// requeued jobs anywhere): an idle dispatch then skips the query for
    /// orgs with work. A wake-up lost on Redis is covered by the next sweep.
    async fn tick_orgs(
        &self,
        sweep: bool,
        woken: Option<Vec<OrgId>>,
    ) -> Result<TickReport, DbError> {
        let mut report = TickReport::default();
        if sweep {
            let started = Instant::now();
            self.sweep(&mut report).await?;
            self.metrics
                .sweep_duration
                .observe(started.elapsed().as_secs_f64());
        }
        let orgs = if sweep { None } else { woken };
        self.dispatch(orgs, &mut report).await?;
        Ok(report)
    }

    async fn until_next_run_at(&self) -> Option<Duration> {
        let mut conn = self.db.conn().await.ok()?;
        let next = db::sweeps::next_run_at(&mut conn).await.ok()??;
        Some((next - Utc::now()).to_std().unwrap_or_default() + Duration::from_millis(1))
    }

    async fn dispatch(
        &self,
        orgs: Option<Vec<OrgId>>,
        report: &mut TickReport,
    ) -> Result<(), DbError> {
        use tracing::Instrument;
        let mut conn = self.db.conn().await?;
        let orgs = match orgs {
            Some(orgs) => orgs,
            None => db::dispatch::orgs_with_work(&mut conn).await?,
        };
        for org in orgs {
            let dispatched = db::dispatch::dispatch_org(&mut conn, &org, &self.dispatch).await?;
            if dispatched.contended {
                report.contended.push(org);
                continue;
            }
            let granted = dispatched.granted;
            if granted.is_empty() {
                continue;
            }
            report.leased += granted.len();
            report.saturated |= dispatched.more;
            self.metrics.leases_granted.inc_by(granted.len() as u64);
            let now = Utc::now();
            for lease in &granted {
                if let Some(queued_at) = lease.queued_at {
                    let latency = (now - queued_at).to_std().unwrap_or_default();
                    self.metrics.dispatch_latency.observe(latency.as_secs_f64());
                }
                tracing::debug!(job.id = %lease.job_id, job.epoch = lease.epoch, agent.id = %lease.agent_id, "leased");
            }
            // One span per batch; each offer in it continues the trace of
            // the request that created its job (stored on the job).
            let span = tracing::info_span!(
                "dispatch",
                org.id = %org,
                leased = granted.len(),
                trace_id = tracing::field::Empty
            );
            telemetry::record_trace_id(&span);
            if !dispatched.more && granted.len() < OFFERS_PUBLISHED_ASIDE_FROM {
                // Publishing before the next wake-up is taken lets wake-ups
                // gather while it runs: fewer, bigger dispatches under
                // steady load, each one commit.
                offer(&self.bus, &org, &granted).instrument(span).await;
                continue;
            }
            // The org has more to lease at once, or this batch is big enough
            // that building its offers would hold up the next dispatch:
            // these committed leases' offers go out while the next dispatch
            // runs (a thousand offers held the loop about 20 ms in a
            // burn-down). An offer that never arrives is covered by the ack
            // timeout, as when publishing fails.
            let permit = self.offers_in_flight.clone().acquire_owned().await;
            let bus = self.bus.clone();
            tokio::spawn(
                async move {
                    offer(&bus, &org, &granted).await;
                    drop(permit);
                }
                .instrument(span),
            );
        }
        Ok(())
    }

    async fn announce(
        &self,
        org: &OrgId,
        job_id: Uuid,
        status: JobStatus,
        attempt: u32,
        epoch: u64,
        agent: Option<Uuid>,
    ) {
        let event = Envelope::new(
            org.clone(),
            Event::JobStatusChanged {
                job_id: JobId(job_id),
                status,
                attempt,
                epoch,
                agent_id: agent.map(AgentId),
            },
        )
        .with_trace(telemetry::current_trace_context());
        self.bus.job_status_changed(&event).await;
    }

    async fn push_cancel(&self, org: &OrgId, agent: Uuid, job: Uuid, epoch: u64, grace: Duration) {
        let event = Envelope::new(
            org.clone(),
            Event::CancelRequested {
                agent_id: AgentId(agent),
                job_id: JobId(job),
                epoch,
                grace_ms: grace.as_millis() as u64,
            },
        );
        self.bus
            .publish_best_effort(&Channel::Agent(AgentId(agent)), &event)
            .await;
    }

    async fn sweep(&self, report: &mut TickReport) -> Result<(), DbError> {
        let mut conn = self.db.conn().await?;

        for due in db::sweeps::expired_leases(&mut conn, SWEEP_BATCH).await? {
            let ending = Ending::Lost(InfraReason::LeaseExpired);
            match db::leases::end_attempt(&mut conn, due.job(), Some(due.epoch as u64), ending)
                .await
            {
                Ok(ended) => {
                    report.expired += 1;
                    self.metrics.leases_expired.inc();
                    tracing::info!(job.id = %due.job_id, job.epoch = due.epoch, status = %ended.status, "lease expired");
                    if let Ok(org) = OrgId::parse(ended.org_id) {
                        self.announce(
                            &org,
                            due.job_id,
                            ended.status,
                            ended.attempt,
                            ended.epoch,
                            ended.agent_id,
                        )
                        .await;
                    }
                }
                Err(error) => ignore_race(error, due.job_id)?,
            }
        }

        for due in db::sweeps::overdue_cancels(&mut conn, SWEEP_BATCH).await? {
            match db::leases::end_attempt(
                &mut conn,
                due.job(),
                Some(due.epoch as u64),
                Ending::CancelForced,
            )
            .await
            {
                Ok(ended) => {
                    report.timed_out += 1;
                    self.metrics
                        .timeouts
                        .with_label_values(&["cancel_forced"])
                        .inc();
                    tracing::info!(job.id = %due.job_id, job.epoch = due.epoch, "cancel forced after grace period");
                    if let Ok(org) = OrgId::parse(ended.org_id) {
                        self.announce(
                            &org,
                            due.job_id,
                            ended.status,
                            ended.attempt,
                            ended.epoch,
                            ended.agent_id,
                        )
                        .await;
                    }
                }
                Err(error) => ignore_race(error, due.job_id)?,
            }
        }

        let timeouts = [
            (
                "run_timeout",
                db::sweeps::run_timeouts(&mut conn, SWEEP_BATCH).await?,
            ),
            (
                "deadline",
                db::sweeps::past_deadline(&mut conn, SWEEP_BATCH).await?,
            ),
            (
                "schedule_to_start",
                db::sweeps::schedule_to_start_expired(&mut conn, SWEEP_BATCH).await?,
            ),
        ];
        for (kind, found) in timeouts {
            for due in found {
                let timeout = match kind {
                    "run_timeout" => Timeout::Run {
                        epoch: due.epoch as u64,
                    },
                    "deadline" => Timeout::Deadline,
                    _ => Timeout::ScheduleToStart,
                };
                match db::leases::time_out(
                    &mut conn,
                    due.job(),
                    timeout,
                    self.settings.cancel_grace,
                )
                .await
                {
                    Ok(job) => {
                        report.timed_out += 1;
                        self.metrics.timeouts.with_label_values(&[kind]).inc();
                        tracing::info!(job.id = %due.job_id, kind, status = %job.status, "timeout applied");
                        let Ok(org) = OrgId::parse(job.org_id.clone()) else {
                            continue;
                        };
                        let lifecycle = job.lifecycle();
                        self.announce(
                            &org,
                            job.id,
                            lifecycle.status,
                            lifecycle.attempt(),
                            lifecycle.epoch,
                            job.agent_id,
                        )
                        .await;
                        if let (JobStatus::CancelRequested, Some(agent)) =
                            (lifecycle.status, job.agent_id)
                        {
                            self.push_cancel(
                                &org,
                                agent,
                                job.id,
                                lifecycle.epoch,
                                self.settings.cancel_grace,
                            )
                            .await;
                        }
                    }
                    Err(error) => ignore_race(error, due.job_id)?,
                }
            }
        }

        // Re-push cancels the agent may have missed (a lost Redis message).
        for pending in db::sweeps::pending_cancels(&mut conn, SWEEP_BATCH).await? {
            let Ok(org) = OrgId::parse(pending.org_id.clone()) else {
                continue;
            };
            let grace = pending
                .cancel_deadline_at
                .and_then(|deadline| (deadline - Utc::now()).to_std().ok())
                .unwrap_or_default();
            self.push_cancel(
                &org,
                pending.agent_id,
                pending.job_id,
                pending.epoch as u64,
                grace,
            )
            .await;
        }

        db::sweeps::purge_idempotency_keys(&mut conn, IDEMPOTENCY_KEY_HOURS).await?;
        if self.depth_count_due() {
            let depths = db::sweeps::queue_depths(&mut conn).await?;
            self.metrics.queue_depth.reset();
            for depth in depths {
                self.metrics
                    .queue_depth
                    .with_label_values(&[depth.org_id.as_str(), depth.queue.as_str()])
                    .set(depth.depth);
            }
        }
        Ok(())
    }

    /// Whether this sweep recounts the queue-depth gauge (and if so, notes
    /// that it does).
    fn depth_count_due(&self) -> bool {
        let mut counted_at = self.depth_counted_at.lock().expect("depth clock");
        let now = Instant::now();
        let due = counted_at
            .is_none_or(|at| now.duration_since(at) >= self.settings.queue_depth_interval);
        if due {
            *counted_at = Some(now);
        }
        due
    }
}

/// A sweep raced with an agent or another replica that changed the job
/// first: nothing to do. Anything else is a real error.
fn ignore_race(error: DbError, job: Uuid) -> Result<(), DbError> {
    match error {
        DbError::Domain(_) | DbError::NotFound => {
            tracing::debug!(job.id = %job, error = %error, "job changed meanwhile; skipped");
            Ok(())
        }
        other => Err(other),
    }
}

/// Wake-ups received since the engine last looked: the orgs they came from,
/// or everything (after a (re)subscription, which may have missed some, and
/// when a timer fired).
#[derive(Default)]
struct Wakeups {
    notify: Notify,
    orgs: Mutex<Option<HashSet<OrgId>>>,
}

impl Wakeups {
    fn wake_org(&self, org: OrgId) {
        self.include(org);
        self.notify.notify_one();
    }

    /// The next pass covers `org`.
    fn include(&self, org: OrgId) {
        if let Some(orgs) = self.lock().as_mut() {
            orgs.insert(org);
        }
    }

    fn wake_all(&self) {
        self.include_all();
        self.notify.notify_one();
    }

    /// The next pass covers every org.
    fn include_all(&self) {
        *self.lock() = None;
    }

    /// The orgs woken since the last call (`None`: all), and starts a new
    /// collection.
    fn take(&self) -> Option<Vec<OrgId>> {
        self.lock()
            .replace(HashSet::new())
            .map(|orgs| orgs.into_iter().collect())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<HashSet<OrgId>>> {
        self.orgs
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Turns `scheduler:wake` messages into notifications, resubscribing after
/// Redis failures. While Redis is down the sweep interval bounds latency.
async fn listen_for_wakeups(bus: Bus, wakeups: Arc<Wakeups>, shutdown: CancellationToken) {
    let mut backoff = Duration::from_millis(200);
    loop {
        let subscription = tokio::select! {
            _ = shutdown.cancelled() => return,
            subscription = bus.subscribe(&[Channel::SchedulerWake]) => subscription,
        };
        match subscription {
            Ok(events) => {
                let mut events = Box::pin(events);
                backoff = Duration::from_millis(200);
                // Catch up on anything published while we were not listening.
                wakeups.wake_all();
                loop {
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        event = events.next() => match event {
                            Some(envelope) => wakeups.wake_org(envelope.org_id),
                            None => break,
                        },
                    }
                }
                tracing::warn!("wake-up subscription ended; resubscribing");
            }
            Err(error) => {
                tracing::warn!(error = %error, "cannot subscribe to wake-ups; the sweep covers meanwhile");
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// Tells each agent's gateway about its leases (one message per agent)
/// and watchers about each status, all in one pipeline; each lease in
/// an `offer` span continuing its job's own trace when it is known.
async fn offer(bus: &Bus, org: &OrgId, granted: &[Granted]) {
    let offers = granted
        .iter()
        .map(|lease| {
            let span = tracing::info_span!(
                "offer",
                job.id = %lease.job_id,
                job.epoch = lease.epoch,
                agent.id = %lease.agent_id,
                trace_id = tracing::field::Empty
            );
            telemetry::adopt_trace(&span, lease.trace().as_ref());
            lease.offer(telemetry::trace_context_of(&span))
        })
        .collect();
    let messages = bus::offer_messages(org, offers, telemetry::current_trace_context());
    if let Err(error) = bus.publish_many(&messages).await {
        tracing::warn!(error = %error, org.id = %org, leases = granted.len(),
            "offers not published; unacknowledged leases lapse and are queued again");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn org(raw: &str) -> OrgId {
        OrgId::parse(raw).expect("valid org id")
    }

    #[test]
    fn wakeups_name_the_orgs_that_woke_and_fall_back_to_all() {
        let wakeups = Wakeups::default();
        // Nothing seen yet (a fresh engine): every org.
        assert_eq!(wakeups.take(), None);
        assert_eq!(wakeups.take(), Some(vec![]));
        wakeups.wake_org(org("acme"));
        wakeups.wake_org(org("acme"));
        assert_eq!(wakeups.take(), Some(vec![org("acme")]));
        wakeups.wake_org(org("acme"));
        wakeups.include_all();
        wakeups.wake_org(org("globex"));
        assert_eq!(wakeups.take(), None, "a pass over every org covers them");
        wakeups.wake_all();
        assert_eq!(wakeups.take(), None);
    }
}
