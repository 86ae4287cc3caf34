//! The per-node fan-out hub: one Redis subscription per channel that has
//! local subscribers, and one *feed* task per such channel.
//!
//! A job feed turns the live `LogLinesAppended` events into a contiguous
//! sequence of pre-serialized frames: it drops lines it already sent, fills
//! any hole (Redis pub/sub drops messages by design) from PostgreSQL, and
//! once a second compares what it sent with the job's log head in
//! PostgreSQL, so a silently lost message is repaired within two seconds.
//! A terminal status goes out only after every line up to the head.
//! Each frame is serialized once and shared by every subscriber.
//!
//! Subscribers get a bounded queue; a subscriber whose queue is full is
//! dropped and its connection's `slow` token cancelled, so a slow consumer
//! never slows the feed. When the last local subscriber of a channel
//! leaves, the feed stops and the Redis subscription is dropped. When the
//! Redis connection drops, the hub reconnects, resubscribes every channel
//! and has every feed resynchronize from PostgreSQL.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use domain::events::{Envelope, Event, JobStatusChange, LogLine};
use domain::job::JobStatus;
use domain::{JobId, OrgId};
use futures_util::StreamExt;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::protocol::{ServerMessage, StatusView, Topic};
use tracing::Instrument;

/// Lines per PostgreSQL page and per backfilled frame.
pub const PAGE: u32 = 500;

/// One frame, serialized once, for every subscriber of a channel.
#[derive(Debug)]
pub enum FeedItem {
    Log {
        first: i64,
        last: i64,
        lines: Vec<LogLine>,
        frame: crate::protocol::Frame,
    },
    Status {
        terminal: bool,
        frame: crate::protocol::Frame,
    },
}

pub type Item = Arc<FeedItem>;

#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("the broadcaster is shutting down")]
    Stopped,
    #[error("database: {0}")]
    Db(String),
}

impl From<db::DbError> for HubError {
    fn from(e: db::DbError) -> Self {
        HubError::Db(e.to_string())
    }
}

impl From<diesel::result::Error> for HubError {
    fn from(e: diesel::result::Error) -> Self {
        HubError::Db(e.to_string())
    }
}

enum RedisCommand {
    Subscribe(String, oneshot::Sender<()>),
    Unsubscribe(String),
}

enum FeedMessage {
    Payload(String),
    Join {
        tx: mpsc::Sender<Item>,
        slow: CancellationToken,
        ack: oneshot::Sender<()>,
    },
    Resync,
}

struct Entry {
    refs: usize,
    inbox: mpsc::UnboundedSender<FeedMessage>,
    stop: CancellationToken,
}

struct Inner {
    db: db::Db,
    prefix: String,
    channels: Mutex<HashMap<String, Entry>>,
    redis: mpsc::UnboundedSender<RedisCommand>,
    runtime: tokio::runtime::Handle,
    check_interval: Duration,
    metrics: Metrics,
}

/// Cheap to clone; shared by every connection of the node.
#[derive(Clone)]
pub struct Hub {
    inner: Arc<Inner>,
}

/// A subscriber's end of a feed. Dropping it leaves the channel.
pub struct Subscription {
    pub items: mpsc::Receiver<Item>,
    _guard: Guard,
}

struct Guard {
    inner: Arc<Inner>,
    name: String,
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.inner.release(&self.name);
    }
}

impl Hub {
    /// Starts the Redis reader; it runs until `shutdown`.
    pub fn start(
        db: db::Db,
        bus: bus::Bus,
        check_interval: Duration,
        metrics: Metrics,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Self> {
        let (tx, rx) = mpsc::unbounded_channel();
        let inner = Arc::new(Inner {
            db,
            prefix: bus.prefix().to_owned(),
            channels: Mutex::new(HashMap::new()),
            redis: tx,
            runtime: tokio::runtime::Handle::current(),
            check_interval,
            metrics,
        });
        tokio::spawn(redis_reader(bus, Arc::downgrade(&inner), rx, shutdown));
        Ok(Self { inner })
    }

    pub fn db(&self) -> &db::Db {
        &self.inner.db
    }

    /// The service's runtime (not an HTTP worker's).
    pub fn runtime(&self) -> &tokio::runtime::Handle {
        &self.inner.runtime
    }

    /// Runs `future` on the service's runtime (not an HTTP worker's).
    pub fn spawn<F>(&self, future: F) -> tokio::task::JoinHandle<()>
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        self.inner.runtime.spawn(future)
    }

    /// Joins `topic`'s feed with a queue of `capacity` items. Returns once
    /// the feed is live (subscribed on Redis when Redis is up): every item
    /// after that is received, so a history read started now misses nothing.
    pub async fn subscribe(
        &self,
        topic: &Topic,
        capacity: usize,
        slow: CancellationToken,
    ) -> Result<Subscription, HubError> {
        let name = topic.name();
        let (tx, items) = mpsc::channel(capacity.max(1));
        let (ack, acked) = oneshot::channel();
        {
            let mut channels = self.inner.lock();
            let entry = channels
                .entry(name.clone())
                .or_insert_with(|| self.inner.start_feed(topic, &name));
            entry.refs += 1;
            let _ = entry.inbox.send(FeedMessage::Join { tx, slow, ack });
        }
        let guard = Guard {
            inner: self.inner.clone(),
            name,
        };
        acked.await.map_err(|_| HubError::Stopped)?;
        Ok(Subscription {
            items,
            _guard: guard,
        })
    }

    /// Channels with local subscribers (for tests and metrics).
    pub fn channel_count(&self) -> usize {
        self.inner.lock().len()
    }
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        // A panic while holding the lock leaves a consistent map.
        self.channels
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn redis_name(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    fn start_feed(self: &Arc<Self>, topic: &Topic, name: &str) -> Entry {
        let (inbox, rx) = mpsc::unbounded_channel();
        let stop = CancellationToken::new();
        let (ready_tx, ready) = oneshot::channel();
        let _ = self
            .redis
            .send(RedisCommand::Subscribe(self.redis_name(name), ready_tx));
        let feed = Feed {
            db: self.db.clone(),
            channel: name.to_owned(),
            subscribers: Vec::new(),
            metrics: self.metrics.clone(),
        };
        self.metrics.feeds.inc();
        match topic {
            Topic::Job(job) => {
                self.runtime.spawn(
                    JobFeed {
                        feed,
                        job: *job,
                        delivered: None,
                        previous_head: None,
                        last_status: None,
                        check_interval: self.check_interval,
                    }
                    .run(rx, ready, stop.clone()),
                );
            }
            Topic::Org(org) => {
                self.runtime
                    .spawn(org_feed(feed, org.clone(), rx, ready, stop.clone()));
            }
        }
        Entry {
            refs: 0,
            inbox,
            stop,
        }
    }

    fn release(&self, name: &str) {
        let mut channels = self.lock();
        let Some(entry) = channels.get_mut(name) else {
            return;
        };
        entry.refs = entry.refs.saturating_sub(1);
        if entry.refs == 0 {
            if let Some(entry) = channels.remove(name) {
                entry.stop.cancel();
                self.metrics.feeds.dec();
            }
            let _ = self
                .redis
                .send(RedisCommand::Unsubscribe(self.redis_name(name)));
        }
    }

    fn dispatch(&self, redis_channel: &str, payload: String) {
        let Some(name) = redis_channel.strip_prefix(&self.prefix) else {
            return;
        };
        if let Some(entry) = self.lock().get(name) {
            let _ = entry.inbox.send(FeedMessage::Payload(payload));
        }
    }

    fn resync_all(&self) {
        for entry in self.lock().values() {
            let _ = entry.inbox.send(FeedMessage::Resync);
        }
    }
}

/// Reads every subscribed channel on one pub/sub connection; reconnects
/// (and resubscribes, and resynchronizes every feed) when it drops.
async fn redis_reader(
    bus: bus::Bus,
    inner: std::sync::Weak<Inner>,
    mut commands: mpsc::UnboundedReceiver<RedisCommand>,
    shutdown: CancellationToken,
) {
    let mut connected_before = false;
    loop {
        let connect = tokio::time::timeout(Duration::from_secs(2), bus.open_pubsub());
        let pubsub = tokio::select! {
            _ = shutdown.cancelled() => return,
            result = connect => match result {
                Ok(Ok(pubsub)) => Some(pubsub),
                Ok(Err(error)) => { tracing::debug!(error = %error, "redis pub/sub unavailable"); None }
                Err(_) => None,
            },
        };
        let Some(pubsub) = pubsub else {
            // Down: acknowledge subscriptions at once (the PostgreSQL check
            // serves them meanwhile); they are made on reconnect.
            let pause = tokio::time::sleep(Duration::from_millis(250));
            tokio::pin!(pause);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = &mut pause => break,
                    command = commands.recv() => match command {
                        None => return,
                        Some(RedisCommand::Subscribe(_, ready)) => { let _ = ready.send(()); }
                        Some(RedisCommand::Unsubscribe(_)) => {}
                    },
                }
            }
            continue;
        };
        let (mut sink, mut stream) = pubsub;
        let Some(hub) = inner.upgrade() else { return };
        let names: Vec<String> = hub.lock().keys().map(|n| hub.redis_name(n)).collect();
        drop(hub);
        if !names.is_empty() && sink.subscribe(&names).await.is_err() {
            continue;
        }
        if connected_before {
            tracing::info!(
                channels = names.len(),
                "redis pub/sub reconnected; resynchronizing from PostgreSQL"
            );
            if let Some(hub) = inner.upgrade() {
                hub.resync_all();
            }
        }
        connected_before = true;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                command = commands.recv() => match command {
                    None => return,
                    Some(RedisCommand::Subscribe(name, ready)) => {
                        let result = sink.subscribe(std::slice::from_ref(&name)).await;
                        let _ = ready.send(());
                        if result.is_err() { break; }
                    }
                    Some(RedisCommand::Unsubscribe(name)) => {
                        if sink.unsubscribe(&name).await.is_err() { break; }
                    }
                },
                message = stream.next() => match message {
                    None => break,
                    Some(message) => {
                        let Some(hub) = inner.upgrade() else { return };
                        hub.dispatch(&message.channel, message.payload);
                    }
                },
            }
        }
        tracing::warn!("redis pub/sub connection lost; reconnecting");
    }
}

struct Subscriber {
    tx: mpsc::Sender<Item>,
    slow: CancellationToken,
}

struct Feed {
    db: db::Db,
    channel: String,
    subscribers: Vec<Subscriber>,
    metrics: Metrics,
}

impl Feed {
    fn broadcast(&mut self, item: FeedItem) {
        let lines = match &item {
            FeedItem::Log { lines, .. } => lines.len() as u64,
            FeedItem::Status { .. } => 0,
        };
        let item = Arc::new(item);
        let delivered = &self.metrics.log_lines_delivered;
        self.subscribers
            .retain(|s| match s.tx.try_send(item.clone()) {
                Ok(()) => {
                    delivered.inc_by(lines);
                    true
                }
                Err(mpsc::error::TrySendError::Full(_)) => {
                    s.slow.cancel();
                    false
                }
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            });
    }

    fn join(&mut self, tx: mpsc::Sender<Item>, slow: CancellationToken, ack: oneshot::Sender<()>) {
        self.subscribers.push(Subscriber { tx, slow });
        let _ = ack.send(());
    }
}

/// The span a feed hands one event out in; it continues the event's trace.
fn fan_out_span(feed: &Feed, envelope: &Envelope) -> tracing::Span {
    let job = match &envelope.event {
        Event::LogLinesAppended { job_id, .. }
        | Event::JobStatusChanged { job_id, .. }
        | Event::JobCreated { job_id, .. } => Some(job_id.to_string()),
        _ => None,
    };
    let epoch = match &envelope.event {
        Event::LogLinesAppended { epoch, .. } | Event::JobStatusChanged { epoch, .. } => {
            Some(*epoch)
        }
        _ => None,
    };
    let span = tracing::info_span!(
        "fan_out",
        channel = %feed.channel,
        event = envelope.event.kind(),
        subscribers = feed.subscribers.len(),
        job.id = job,
        job.epoch = epoch,
        request.id = envelope.request_id.as_deref(),
        trace_id = tracing::field::Empty
    );
    telemetry::adopt_trace(&span, envelope.trace.as_ref());
    span
}

/// Builds a log frame for `lines` on `channel`.
pub fn log_item(channel: &str, job: JobId, lines: Vec<LogLine>) -> Option<FeedItem> {
    let first = lines.first()?.seq;
    let last = lines.last()?.seq;
    let frame = ServerMessage::Log {
        channel,
        job_id: job,
        lines: &lines,
    }
    .frame();
    Some(FeedItem::Log {
        first,
        last,
        lines,
        frame,
    })
}

/// The last stored sequence number of `job` (0 when it has no lines).
pub async fn log_head(db: &db::Db, job: JobId) -> Result<i64, HubError> {
    use db::schema::job_log_heads;
    use diesel::prelude::*;
    use diesel_async::RunQueryDsl;
    let mut conn = db.conn().await?;
    let next: Option<i64> = job_log_heads::table
        .find(job.as_uuid())
        .select(job_log_heads::next_seq)
        .first(&mut conn)
        .await
        .optional()?;
    Ok(next.map_or(0, |n| n - 1))
}

struct JobFeed {
    feed: Feed,
    job: JobId,
    /// The last sequence number broadcast; `None` until known.
    delivered: Option<i64>,
    /// The head seen at the previous check.
    previous_head: Option<i64>,
    last_status: Option<(JobStatus, i64)>,
    check_interval: Duration,
}

impl JobFeed {
    async fn run(
        mut self,
        mut inbox: mpsc::UnboundedReceiver<FeedMessage>,
        ready: oneshot::Receiver<()>,
        stop: CancellationToken,
    ) {
        let _ = tokio::time::timeout(Duration::from_secs(2), ready).await;
        // Subscribed first, then read the head: anything committed later
        // arrives live (or is repaired by the check).
        if let Ok(head) = log_head(&self.feed.db, self.job).await {
            self.delivered = Some(head);
        }
        if let Ok(row) = self.row().await {
            self.last_status = Some((row.status(), row.lease_epoch));
        }
        let mut check = tokio::time::interval(self.check_interval);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                message = inbox.recv() => match message {
                    None => return,
                    Some(FeedMessage::Join { tx, slow, ack }) => self.feed.join(tx, slow, ack),
                    Some(FeedMessage::Payload(payload)) => self.on_payload(&payload).await,
                    Some(FeedMessage::Resync) => {
                        self.backfill(i64::MAX).await;
                        self.sync_status().await;
                    }
                },
                _ = check.tick() => self.check().await,
            }
        }
    }

    async fn row(&self) -> Result<db::jobs::Job, HubError> {
        let mut conn = self.feed.db.conn().await?;
        Ok(db::jobs::get_any(&mut conn, self.job).await?)
    }

    async fn on_payload(&mut self, payload: &str) {
        let Ok(envelope) = serde_json::from_str::<Envelope>(payload) else {
            tracing::warn!(channel = %self.feed.channel, "skipping malformed event");
            return;
        };
        // The fan-out continues the trace of the event (the agent's write).
        let span = fan_out_span(&self.feed, &envelope);
        self.on_event(envelope).instrument(span).await;
    }

    async fn on_event(&mut self, envelope: Envelope) {
        match envelope.event {
            Event::LogLinesAppended { job_id, lines, .. } if job_id == self.job => {
                self.on_lines(lines).await;
            }
            Event::JobStatusChanged { job_id, .. } if job_id == self.job => {
                self.sync_status().await;
            }
            _ => {}
        }
    }

    async fn on_lines(&mut self, mut lines: Vec<LogLine>) {
        let (Some(first), Some(last)) = (lines.first(), lines.last()) else {
            return;
        };
        let (first, last) = (first.seq, last.seq);
        let delivered = *self.delivered.get_or_insert(first - 1);
        if last <= delivered {
            return;
        }
        if first > delivered + 1 {
            self.backfill(first - 1).await;
        }
        let delivered = self.delivered.unwrap_or(first - 1);
        lines.retain(|l| l.seq > delivered);
        if let Some(item) = log_item(&self.feed.channel, self.job, lines) {
            self.delivered = Some(last);
            self.feed.broadcast(item);
        }
    }

    /// Broadcasts stored lines after `delivered` up to `upto`, in pages.
    async fn backfill(&mut self, upto: i64) {
        let Some(mut delivered) = self.delivered else {
            if let Ok(head) = log_head(&self.feed.db, self.job).await {
                self.delivered = Some(head);
            }
            return;
        };
        while delivered < upto {
            let page = match self.read(delivered).await {
                Ok(page) => page,
                Err(error) => {
                    tracing::warn!(error = %error, job.id = %self.job, "backfill failed; retrying at the next check");
                    return;
                }
            };
            let full = page.len() as u32 == PAGE;
            let lines: Vec<LogLine> = page.into_iter().filter(|l| l.seq <= upto).collect();
            let Some(last) = lines.last().map(|l| l.seq) else {
                return;
            };
            if let Some(item) = log_item(&self.feed.channel, self.job, lines) {
                self.feed.broadcast(item);
            }
            delivered = last;
            self.delivered = Some(last);
            if !full {
                return;
            }
        }
    }

    async fn read(&self, after: i64) -> Result<Vec<LogLine>, HubError> {
        let mut conn = self.feed.db.conn().await?;
        Ok(db::logs::read(&mut conn, self.job, after, PAGE).await?)
    }

    /// The safety net: lines committed a check ago and still not delivered
    /// were lost on the way; a status that changed unseen is sent.
    async fn check(&mut self) {
        let Ok(head) = log_head(&self.feed.db, self.job).await else {
            return;
        };
        if let (Some(previous), Some(delivered)) = (self.previous_head, self.delivered)
            && delivered < previous
        {
            self.backfill(head).await;
        }
        if self.delivered.is_none() {
            self.delivered = Some(head);
        }
        self.previous_head = Some(head);
        self.sync_status().await;
    }

    async fn sync_status(&mut self) {
        let Ok(row) = self.row().await else {
            return;
        };
        let key = (row.status(), row.lease_epoch);
        if self.last_status == Some(key) {
            return;
        }
        if key.0.is_terminal() {
            // No line can be appended any more: send them all first.
            self.backfill(i64::MAX).await;
        }
        self.last_status = Some(key);
        let view = StatusView::from_row(self.feed.channel.clone(), &row);
        let terminal = view.terminal;
        let frame = ServerMessage::Status(view).frame();
        self.feed.broadcast(FeedItem::Status { terminal, frame });
    }
}

async fn org_feed(
    mut feed: Feed,
    org: OrgId,
    mut inbox: mpsc::UnboundedReceiver<FeedMessage>,
    ready: oneshot::Receiver<()>,
    stop: CancellationToken,
) {
    let _ = tokio::time::timeout(Duration::from_secs(2), ready).await;
    loop {
        let message = tokio::select! {
            _ = stop.cancelled() => return,
            message = inbox.recv() => message,
        };
        match message {
            None => return,
            Some(FeedMessage::Join { tx, slow, ack }) => feed.join(tx, slow, ack),
            Some(FeedMessage::Resync) => {}
            Some(FeedMessage::Payload(payload)) => {
                let Ok(envelope) = serde_json::from_str::<Envelope>(&payload) else {
                    continue;
                };
                if envelope.org_id != org {
                    continue;
                }
                let _span = fan_out_span(&feed, &envelope).entered();
                let at = envelope.occurred_at;
                match envelope.event {
                    Event::JobStatusChanged {
                        job_id,
                        status,
                        attempt,
                        epoch,
                        agent_id,
                    } => {
                        let change = JobStatusChange {
                            job_id,
                            status,
                            attempt,
                            epoch,
                            agent_id,
                        };
                        broadcast_change(&mut feed, &change, at);
                    }
                    // A batch goes out as the same frames, one per job.
                    Event::JobStatusesChanged { changes } => {
                        for change in &changes {
                            broadcast_change(&mut feed, change, at);
                        }
                    }
                    Event::JobCreated {
                        job_id,
                        queue,
                        status,
                    } => {
                        let view = StatusView {
                            channel: feed.channel.clone(),
                            job_id,
                            status,
                            attempt: None,
                            epoch: None,
                            agent_id: None,
                            queue: Some(queue.as_str().to_owned()),
                            created_at: Some(at),
                            started_at: None,
                            finished_at: None,
                            at,
                            terminal: false,
                        };
                        let frame = ServerMessage::Status(view).frame();
                        feed.broadcast(FeedItem::Status {
                            terminal: false,
                            frame,
                        });
                    }
                    _ => {}
                }
            }
        }
    }
}

/// Sends an org's subscribers the status frame of one job's change.
fn broadcast_change(feed: &mut Feed, change: &JobStatusChange, at: DateTime<Utc>) {
    let view = StatusView {
        channel: feed.channel.clone(),
        job_id: change.job_id,
        status: change.status,
        attempt: Some(change.attempt),
        epoch: Some(change.epoch),
        agent_id: change.agent_id.map(|a| a.as_uuid()),
        queue: None,
        created_at: None,
        started_at: None,
        finished_at: None,
        at,
        terminal: change.status.is_terminal(),
    };
    let terminal = view.terminal;
    let frame = ServerMessage::Status(view).frame();
    feed.broadcast(FeedItem::Status { terminal, frame });
}
