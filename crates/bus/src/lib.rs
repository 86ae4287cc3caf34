//! The Redis event bus. It carries wake-ups and live fan-out only:
//! everything on it is also in PostgreSQL, so a lost message costs latency,
//! never data. Producers publish *after* their transaction commits.
//!
//! Every key and channel starts with the configured prefix
//! (`REDIS_KEY_PREFIX`), so several deployments, or parallel tests, can
//! share one Redis.
//!
//! Three deployments are spoken ([`Topology`]): one Redis, Redis Cluster
//! (sharded pub/sub) and Redis Sentinel (every connection asks the
//! Sentinels for the current primary, so the bus follows a failover).

pub mod metrics;
mod sentinel;

pub use sentinel::SentinelPrimary;

use std::time::Duration;

use domain::events::{Envelope, Event, JobStatusChange, Offer, TraceContext};
use domain::{AgentId, JobId, OrgId};
use futures_util::{Stream, StreamExt};
use redis::AsyncCommands;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("event encoding: {0}")]
    Encoding(#[from] serde_json::Error),
}

pub type BusResult<T> = Result<T, BusError>;

/// The channels Switchyard uses.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Channel {
    /// Something the scheduler should look at now (job created, agent
    /// connected, capacity freed).
    SchedulerWake,
    /// Log lines and status of one job.
    Job(JobId),
    /// Status changes of all jobs of an org, and queue changes.
    Org(OrgId),
    /// Messages for one agent's session, delivered by whichever gateway
    /// replica holds it.
    Agent(AgentId),
}

impl Channel {
    fn write_suffix(&self, name: &mut String) {
        use std::fmt::Write;
        // Writing to a String cannot fail.
        let _ = match self {
            Channel::SchedulerWake => write!(name, "scheduler:wake"),
            Channel::Job(id) => write!(name, "job:{id}"),
            Channel::Org(id) => write!(name, "org:{id}"),
            Channel::Agent(id) => write!(name, "agent:{id}"),
        };
    }
}

/// Which Redis deployment the bus talks to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Topology {
    /// One Redis (possibly a primary with replicas behind one address).
    Single,
    /// Redis Cluster: events go over sharded pub/sub (`SPUBLISH` /
    /// `SSUBSCRIBE`), so each channel lives on the shard owning its slot
    /// instead of being broadcast to every node.
    Cluster,
    /// Redis Sentinel: the URL lists Sentinels, which name the current
    /// primary of `master`; every connection (commands, publishes,
    /// subscriptions, readiness) asks them before connecting, so after a
    /// failover reconnects land on the new primary.
    Sentinel { master: String },
}

/// Connection settings.
#[derive(Clone)]
pub struct BusConfig {
    /// For [`Topology::Single`] one URL; for [`Topology::Cluster`] one or
    /// more seed nodes, comma-separated; for [`Topology::Sentinel`] one or
    /// more Sentinels, comma-separated, whose password, database and TLS
    /// settings are those of the data nodes.
    pub url: String,
    pub topology: Topology,
    pub prefix: String,
    /// Per-command timeout; also bounds how long a readiness probe waits.
    pub command_timeout: Duration,
    /// [`Topology::Sentinel`] only: the Sentinels' own password, when they
    /// require one (the data nodes' comes from the URLs).
    pub sentinel_password: Option<String>,
}

/// Passwords (in URLs and the Sentinels') are shown as `***`, so a logged
/// configuration leaks no secret.
impl std::fmt::Debug for BusConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BusConfig")
            .field("url", &redact_urls(&self.url))
            .field("topology", &self.topology)
            .field("prefix", &self.prefix)
            .field("command_timeout", &self.command_timeout)
            .field(
                "sentinel_password",
                &self.sentinel_password.as_ref().map(|_| "***"),
            )
            .finish()
    }
}

/// `redis://user:secret@host` becomes `redis://user:***@host`, for each
/// comma-separated URL; any user information without a `user:` part, or
/// in an entry without a scheme, is hidden whole.
pub fn redact_urls(urls: &str) -> String {
    urls.split(',')
        .map(|url| {
            let (scheme, rest) = match url.split_once("://") {
                Some((scheme, rest)) => (format!("{scheme}://"), rest),
                None => (String::new(), url),
            };
            let Some((userinfo, host)) = rest.rsplit_once('@') else {
                return url.to_owned();
            };
            match userinfo.split_once(':') {
                Some((user, _)) if !scheme.is_empty() => format!("{scheme}{user}:***@{host}"),
                _ => format!("{scheme}***@{host}"),
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

impl BusConfig {
    pub fn new(url: impl Into<String>, prefix: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            topology: Topology::Single,
            prefix: prefix.into(),
            command_timeout: Duration::from_secs(1),
            sentinel_password: None,
        }
    }

    /// A Redis Cluster reached through `seeds` (comma-separated URLs).
    pub fn cluster(seeds: impl Into<String>, prefix: impl Into<String>) -> Self {
        Self {
            topology: Topology::Cluster,
            ..Self::new(seeds, prefix)
        }
    }

    /// Redis behind Sentinels: `sentinels` (comma-separated URLs) name the
    /// current primary of `master`.
    pub fn sentinel(
        sentinels: impl Into<String>,
        master: impl Into<String>,
        prefix: impl Into<String>,
    ) -> Self {
        Self {
            topology: Topology::Sentinel {
                master: master.into(),
            },
            ..Self::new(sentinels, prefix)
        }
    }

    /// The Sentinels' own password ([`Topology::Sentinel`] only).
    pub fn with_sentinel_password(mut self, password: Option<String>) -> Self {
        self.sentinel_password = password;
        self
    }

    fn seeds(&self) -> Vec<String> {
        self.url
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect()
    }
}

/// A handle on Redis: cheap to clone. Commands reconnect by themselves
/// after Redis comes back.
#[derive(Clone)]
pub struct Bus {
    backend: Backend,
    conn: Connection,
    prefix: String,
}

#[derive(Clone)]
enum Backend {
    Single(redis::Client),
    Cluster(ClusterSeeds),
    /// The same connection as [`Connection::Sentinel`]; subscriptions ask
    /// the Sentinels through it.
    Sentinel(std::sync::Arc<SentinelPrimary>),
}

#[derive(Clone)]
struct ClusterSeeds {
    urls: Vec<String>,
    timeout: Duration,
}

impl ClusterSeeds {
    fn builder(&self) -> redis::cluster::ClusterClientBuilder {
        redis::cluster::ClusterClientBuilder::new(self.urls.clone())
            .connection_timeout(self.timeout)
            .response_timeout(self.timeout)
            .retries(1)
    }
}

/// A command connection to whichever Redis the bus uses; implements
/// [`redis::aio::ConnectionLike`], so commands and (non-atomic) pipelines
/// run on it the same way on a single Redis and on a cluster.
#[derive(Clone)]
pub enum Connection {
    Single(ConnectionManager),
    Cluster(std::sync::Arc<LazyCluster>),
    Sentinel(std::sync::Arc<SentinelPrimary>),
}

/// A cluster connection opened on first use, so a service starts (and
/// reports not-ready) while the cluster is down.
pub struct LazyCluster {
    client: redis::cluster::ClusterClient,
    conn: tokio::sync::OnceCell<ClusterConnection>,
}

impl LazyCluster {
    async fn get(&self) -> redis::RedisResult<ClusterConnection> {
        self.conn
            .get_or_try_init(|| self.client.get_async_connection())
            .await
            .cloned()
    }
}

impl redis::aio::ConnectionLike for Connection {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            Connection::Single(conn) => conn.req_packed_command(cmd),
            Connection::Cluster(lazy) => {
                Box::pin(async move { lazy.get().await?.req_packed_command(cmd).await })
            }
            Connection::Sentinel(primary) => Box::pin(async move {
                primary
                    .run(|mut conn| async move { conn.req_packed_command(cmd).await })
                    .await
            }),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Connection::Single(conn) => conn.req_packed_commands(cmd, offset, count),
            Connection::Cluster(lazy) => Box::pin(async move {
                lazy.get()
                    .await?
                    .req_packed_commands(cmd, offset, count)
                    .await
            }),
            Connection::Sentinel(primary) => Box::pin(async move {
                primary
                    .run(|mut conn| async move {
                        conn.req_packed_commands(cmd, offset, count).await
                    })
                    .await
            }),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Connection::Single(conn) => conn.get_db(),
            Connection::Cluster(..) => 0,
            // The database named in the URLs, selected on every connection.
            Connection::Sentinel(primary) => primary.db(),
        }
    }
}

/// `envelope` serialized for `channel`, ready for [`Bus::publish_many`];
/// `None` (logged) if it does not serialize.
pub fn message(channel: Channel, envelope: &Envelope) -> Option<(Channel, String)> {
    let payload = serde_json::to_string(envelope)
        .inspect_err(|error| {
            tracing::error!(error = %error, event = envelope.event.kind(), "cannot encode an event")
        })
        .ok()?;
    Some((channel, payload))
}

/// The messages announcing a `JobStatusChanged` envelope: the same
/// payload on the job's channel and on its org's. `None` for any other
/// event, or one that does not serialize (logged).
pub fn status_messages(envelope: &Envelope) -> Option<[(Channel, String); 2]> {
    let Event::JobStatusChanged { job_id, .. } = &envelope.event else {
        return None;
    };
    let (job, payload) = message(Channel::Job(*job_id), envelope)?;
    Some([
        (job, payload.clone()),
        (Channel::Org(envelope.org_id.clone()), payload),
    ])
}

/// The messages announcing several jobs' new statuses, each envelope with
/// its job's trace: a `JobStatusChanged` on each job's channel (in the
/// order given), then the org's: for one change the same message, for
/// several one `JobStatusesChanged` carrying `batch_trace`, so watchers of
/// an org cost one message per write rather than one per job.
pub fn statuses_messages(
    org: &OrgId,
    changes: Vec<(JobStatusChange, Option<TraceContext>)>,
    batch_trace: Option<TraceContext>,
) -> Vec<(Channel, String)> {
    if let [(change, trace)] = changes.as_slice() {
        let envelope = Envelope::new(org.clone(), change.event()).with_trace(trace.clone());
        return status_messages(&envelope).into_iter().flatten().collect();
    }
    let mut messages = Vec::with_capacity(changes.len() + 1);
    let mut batch = Vec::with_capacity(changes.len());
    for (change, trace) in changes {
        let envelope = Envelope::new(org.clone(), change.event()).with_trace(trace);
        messages.extend(message(Channel::Job(change.job_id), &envelope));
        batch.push(change);
    }
    if !batch.is_empty() {
        let envelope = Envelope::new(org.clone(), Event::JobStatusesChanged { changes: batch })
            .with_trace(batch_trace);
        messages.extend(message(Channel::Org(org.clone()), &envelope));
    }
    messages
}

/// The messages that hand granted leases to their agents' gateways, one
/// per agent (offers first: they are what the agents wait for), then the
/// leases' `Leased` statuses ([`statuses_messages`]). Each offer carries
/// its job's trace; `batch_trace` goes on a message holding several.
pub fn offer_messages(
    org: &OrgId,
    offers: Vec<(AgentId, Offer)>,
    batch_trace: Option<TraceContext>,
) -> Vec<(Channel, String)> {
    use std::collections::HashMap;
    let mut statuses = Vec::with_capacity(offers.len());
    let mut by_agent: HashMap<AgentId, Vec<Offer>> = HashMap::new();
    for (agent_id, offer) in offers {
        let change = JobStatusChange {
            job_id: offer.job_id,
            status: domain::job::JobStatus::Leased,
            attempt: offer.attempt,
            epoch: offer.epoch,
            agent_id: Some(agent_id),
        };
        statuses.push((change, offer.trace.clone()));
        by_agent.entry(agent_id).or_default().push(offer);
    }
    let mut messages = Vec::with_capacity(by_agent.len() + statuses.len() + 1);
    for (agent_id, mut offers) in by_agent {
        // A single lease keeps the single-offer message (and its trace on
        // the envelope), which gateways of every version read.
        let (event, trace) = if offers.len() == 1 {
            let offer = offers.pop().expect("one offer");
            let event = Event::AssignmentOffered {
                agent_id,
                job_id: offer.job_id,
                epoch: offer.epoch,
                attempt: offer.attempt,
                lease_expires_at: offer.lease_expires_at,
                job: offer.job,
            };
            (event, offer.trace)
        } else {
            let event = Event::AssignmentsOffered { agent_id, offers };
            (event, batch_trace.clone())
        };
        let envelope = Envelope::new(org.clone(), event).with_trace(trace);
        messages.extend(message(Channel::Agent(agent_id), &envelope));
    }
    messages.extend(statuses_messages(org, statuses, batch_trace));
    messages
}

impl Bus {
    /// Prepares the connection without opening it, so a service can start
    /// (and report not-ready) while Redis is down. Fails only on a bad URL.
    /// Call it inside a Tokio runtime.
    pub fn connect(config: &BusConfig) -> BusResult<Self> {
        let (backend, conn) = match &config.topology {
            Topology::Single => {
                let client = redis::Client::open(config.url.as_str())?;
                let manager_config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(config.command_timeout))
                    .set_response_timeout(Some(config.command_timeout))
                    .set_number_of_retries(1)
                    .set_max_delay(Duration::from_millis(500));
                let conn = ConnectionManager::new_lazy_with_config(client.clone(), manager_config)?;
                (Backend::Single(client), Connection::Single(conn))
            }
            Topology::Cluster => {
                let seeds = config.seeds();
                if seeds.is_empty() {
                    return Err(BusError::Redis(redis::RedisError::from((
                        redis::ErrorKind::InvalidClientConfig,
                        "no Redis Cluster seed node given",
                    ))));
                }
                let seeds = ClusterSeeds {
                    urls: seeds,
                    timeout: config.command_timeout,
                };
                let client = seeds.builder().build()?;
                (
                    Backend::Cluster(seeds),
                    Connection::Cluster(std::sync::Arc::new(LazyCluster {
                        client,
                        conn: Default::default(),
                    })),
                )
            }
            Topology::Sentinel { master } => {
                let sentinels = sentinel::Sentinels::new(
                    &config.seeds(),
                    master,
                    config.sentinel_password.as_deref(),
                    config.command_timeout,
                )?;
                let primary = std::sync::Arc::new(SentinelPrimary::new(
                    std::sync::Arc::new(sentinels),
                    config.command_timeout,
                ));
                (
                    Backend::Sentinel(primary.clone()),
                    Connection::Sentinel(primary),
                )
            }
        };
        Ok(Self {
            backend,
            conn,
            prefix: config.prefix.clone(),
        })
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The full Redis name of a channel.
    pub fn channel_name(&self, channel: &Channel) -> String {
        let mut name = String::with_capacity(self.prefix.len() + 48);
        name.push_str(&self.prefix);
        channel.write_suffix(&mut name);
        name
    }

    /// The full Redis name of a key.
    pub fn key(&self, suffix: &str) -> String {
        format!("{}{}", self.prefix, suffix)
    }

    /// A connection for commands (keys, counters) beyond publish. On a
    /// cluster, keys of one multi-key command or atomic pipeline must share
    /// a hash slot.
    pub fn connection(&self) -> Connection {
        self.conn.clone()
    }

    /// Readiness: Redis answers. Under Sentinel the node must also still
    /// be the primary (a demoted one answers `PING` too).
    pub async fn ping(&self) -> BusResult<()> {
        if let Backend::Sentinel(primary) = &self.backend {
            primary.check_primary().await?;
            return Ok(());
        }
        let mut conn = self.conn.clone();
        let _: String = redis::cmd("PING").query_async(&mut conn).await?;
        Ok(())
    }

    /// Publishes an event; returns how many subscribers received it.
    pub async fn publish(&self, channel: &Channel, envelope: &Envelope) -> BusResult<usize> {
        let payload = serde_json::to_string(envelope)?;
        self.publish_raw(channel, payload).await
    }

    /// Publishes an already serialized payload (serialize once, publish to
    /// several channels).
    pub async fn publish_raw(&self, channel: &Channel, payload: String) -> BusResult<usize> {
        metrics::observe_publish(channel, async {
            let mut conn = self.conn.clone();
            let name = self.channel_name(channel);
            Ok(match self.backend {
                Backend::Single(_) | Backend::Sentinel(_) => conn.publish(name, payload).await?,
                Backend::Cluster(_) => conn.spublish(name, payload).await?,
            })
        })
        .await
    }

    /// Publishes several already serialized payloads: on a single Redis or
    /// behind Sentinel as one pipeline (one write, one round trip, instead
    /// of one each); on a cluster each to its own shard. Fails if any
    /// publish failed.
    pub async fn publish_many(&self, messages: &[(Channel, String)]) -> BusResult<()> {
        if messages.is_empty() {
            return Ok(());
        }
        if let Backend::Cluster(_) = self.backend {
            let published = futures_util::future::join_all(
                messages
                    .iter()
                    .map(|(channel, payload)| self.publish_raw(channel, payload.clone())),
            )
            .await;
            return published
                .into_iter()
                .try_for_each(|result| result.map(drop));
        }
        let mut pipeline = redis::pipe();
        for (channel, payload) in messages {
            pipeline
                .publish(self.channel_name(channel), payload)
                .ignore();
        }
        let mut conn = self.conn.clone();
        metrics::observe_publishes(
            messages.iter().map(|(channel, _)| channel),
            pipeline.query_async::<()>(&mut conn),
        )
        .await?;
        Ok(())
    }

    /// Publishes, logging instead of failing: for the after-commit
    /// notifications whose loss the periodic sweeps repair.
    pub async fn publish_best_effort(&self, channel: &Channel, envelope: &Envelope) {
        if let Err(error) = self.publish(channel, envelope).await {
            tracing::warn!(error = %error, channel = %self.channel_name(channel), event = envelope.event.kind(),
                "event not published; consumers will catch up from PostgreSQL");
        }
    }

    /// Announces a job's new status on its own channel and its org's,
    /// serializing the event once.
    pub async fn job_status_changed(&self, envelope: &Envelope) {
        let Some(messages) = status_messages(envelope) else {
            return;
        };
        if let Err(error) = self.publish_many(&messages).await {
            tracing::warn!(error = %error, channel = %self.channel_name(&messages[0].0), "status event not published; readers catch up from PostgreSQL");
        }
    }

    /// Subscribes to `channels` on a dedicated connection. The stream ends
    /// when the connection drops; callers resubscribe and backfill from
    /// PostgreSQL. Messages that do not parse are skipped with a warning.
    pub async fn subscribe(
        &self,
        channels: &[Channel],
    ) -> BusResult<impl Stream<Item = Envelope> + use<>> {
        let names: Vec<String> = channels.iter().map(|c| self.channel_name(c)).collect();
        let (mut sink, messages) = self.open_pubsub().await?;
        sink.subscribe(&names).await?;
        // The sink owns the subscriptions: it lives as long as the stream.
        let channels = names.len();
        let events = messages.filter_map(move |message| {
            let _sink = &sink;
            futures_util::future::ready(parse_payload(&message.channel, &message.payload))
        });
        Ok(metrics::Counted::new(events, channels))
    }

    /// A pub/sub connection whose channels change over time: subscribe and
    /// unsubscribe through the sink while reading the stream. The stream
    /// ends when the connection drops (on a cluster: when any node's
    /// does); what was published meanwhile is lost, so callers reopen,
    /// resubscribe and backfill from PostgreSQL.
    pub async fn open_pubsub(&self) -> BusResult<(PubSubSink, RawMessages)> {
        match &self.backend {
            Backend::Single(client) => Ok(plain_pubsub(client.get_async_pubsub().await?)),
            // Opened on the primary the Sentinels name now. When the node
            // is demoted, Sentinel kills its clients: the stream ends and
            // the caller reopens here, on the new primary.
            Backend::Sentinel(primary) => Ok(plain_pubsub(primary.pubsub().await?)),
            Backend::Cluster(seeds) => {
                let (sender, receiver) = tokio::sync::mpsc::unbounded_channel::<redis::PushInfo>();
                let client = seeds
                    .builder()
                    .use_protocol(redis::ProtocolVersion::RESP3)
                    .push_sender(sender)
                    .build()?;
                let conn = client.get_async_connection().await?;
                let pushes = futures_util::stream::unfold(receiver, |mut receiver| async move {
                    let push = receiver.recv().await?;
                    Some((push, receiver))
                });
                let messages = pushes
                    .take_while(|push| {
                        futures_util::future::ready(push.kind != redis::PushKind::Disconnection)
                    })
                    .filter_map(|push| {
                        futures_util::future::ready(match (push.kind, push.data.as_slice()) {
                            (redis::PushKind::SMessage, [channel, payload]) => {
                                match (
                                    redis::from_redis_value_ref::<String>(channel),
                                    redis::from_redis_value_ref::<String>(payload),
                                ) {
                                    (Ok(channel), Ok(payload)) => {
                                        Some(RawMessage { channel, payload })
                                    }
                                    _ => None,
                                }
                            }
                            _ => None,
                        })
                    });
                Ok((PubSubSink::Cluster(conn), messages.boxed()))
            }
        }
    }
}

/// Splits a (non-sharded) pub/sub connection into sink and message stream;
/// the stream ends when the connection drops.
fn plain_pubsub(pubsub: redis::aio::PubSub) -> (PubSubSink, RawMessages) {
    let (sink, stream) = pubsub.split();
    let messages = stream.filter_map(|message| {
        futures_util::future::ready(message.get_payload::<String>().ok().map(|payload| {
            RawMessage {
                channel: message.get_channel_name().to_owned(),
                payload,
            }
        }))
    });
    (PubSubSink::Single(sink), messages.boxed())
}

/// One message as published: full channel name and payload.
#[derive(Clone, Debug)]
pub struct RawMessage {
    pub channel: String,
    pub payload: String,
}

pub type RawMessages = std::pin::Pin<Box<dyn Stream<Item = RawMessage> + Send>>;

/// The subscribing half of [`Bus::open_pubsub`]. Dropping it closes the
/// connection.
pub enum PubSubSink {
    /// Plain `SUBSCRIBE`: a single Redis, or the primary behind Sentinels.
    Single(redis::aio::PubSubSink),
    /// Sharded subscriptions (`SSUBSCRIBE`), one channel per command since
    /// channels of one command must share a slot.
    Cluster(ClusterConnection),
}

impl PubSubSink {
    pub async fn subscribe(&mut self, names: &[String]) -> BusResult<()> {
        if names.is_empty() {
            return Ok(());
        }
        match self {
            PubSubSink::Single(sink) => sink.subscribe(names).await?,
            PubSubSink::Cluster(conn) => {
                for name in names {
                    conn.ssubscribe(name).await?;
                }
            }
        }
        Ok(())
    }

    pub async fn unsubscribe(&mut self, name: &str) -> BusResult<()> {
        match self {
            PubSubSink::Single(sink) => sink.unsubscribe(name).await?,
            PubSubSink::Cluster(conn) => conn.sunsubscribe(name).await?,
        }
        Ok(())
    }
}

fn parse_payload(channel: &str, payload: &str) -> Option<Envelope> {
    match serde_json::from_str::<Envelope>(payload) {
        Ok(envelope) => Some(envelope),
        Err(error) => {
            tracing::warn!(error = %error, channel, "skipping malformed event");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn channel_names_carry_the_prefix() {
        let bus = Bus::connect(&BusConfig::new("redis://127.0.0.1:6379", "sy:")).expect("bus");
        let job = JobId::new();
        assert_eq!(
            bus.channel_name(&Channel::Job(job)),
            format!("sy:job:{job}")
        );
        assert_eq!(
            bus.channel_name(&Channel::SchedulerWake),
            "sy:scheduler:wake"
        );
        assert_eq!(bus.key("x"), "sy:x");
    }

    #[test]
    fn passwords_never_show_in_debug_output() {
        assert_eq!(
            redact_urls("redis://:pw1@a:1, rediss://u:pw2@b:2,redis://c:3,pw3@d:4,redis://pw4@e"),
            "redis://:***@a:1, rediss://u:***@b:2,redis://c:3,***@d:4,redis://***@e"
        );
        let config = BusConfig::sentinel("redis://:data-pw@s:26379", "m", "sy:")
            .with_sentinel_password(Some("sentinel-pw".into()));
        let shown = format!("{config:?}");
        assert!(
            !shown.contains("data-pw") && !shown.contains("sentinel-pw"),
            "{shown}"
        );
    }

    #[test]
    fn a_sentinel_config_needs_a_sentinel_and_a_master_name() {
        assert!(Bus::connect(&BusConfig::sentinel(" , ", "m", "sy:")).is_err());
        assert!(Bus::connect(&BusConfig::sentinel("redis://s:26379", " ", "sy:")).is_err());
    }

    #[test]
    fn a_bad_url_is_refused_at_once() {
        assert!(Bus::connect(&BusConfig::new("not a url", "sy:")).is_err());
    }

    fn leased(job_id: JobId) -> (JobStatusChange, Option<TraceContext>) {
        let change = JobStatusChange {
            job_id,
            status: domain::job::JobStatus::Leased,
            attempt: 1,
            epoch: 7,
            agent_id: Some(AgentId::new()),
        };
        (change, None)
    }

    fn event_of(payload: &str) -> Event {
        serde_json::from_str::<Envelope>(payload)
            .expect("envelope")
            .event
    }

    #[test]
    fn one_status_change_is_the_same_message_on_both_channels() {
        let org = OrgId::parse("acme").expect("org");
        let job = JobId::new();
        let messages = statuses_messages(&org, vec![leased(job)], None);
        let channels: Vec<_> = messages.iter().map(|(c, _)| c.clone()).collect();
        assert_eq!(channels, [Channel::Job(job), Channel::Org(org)]);
        assert_eq!(messages[0].1, messages[1].1);
        assert!(
            matches!(event_of(&messages[0].1), Event::JobStatusChanged { job_id, .. } if job_id == job)
        );
    }

    #[test]
    fn several_status_changes_go_to_each_job_and_once_to_the_org() {
        let org = OrgId::parse("acme").expect("org");
        let jobs = [JobId::new(), JobId::new(), JobId::new()];
        let messages = statuses_messages(&org, jobs.iter().map(|&j| leased(j)).collect(), None);
        assert_eq!(messages.len(), 4);
        for (job, (channel, payload)) in jobs.iter().zip(&messages) {
            assert_eq!(channel, &Channel::Job(*job));
            assert!(
                matches!(event_of(payload), Event::JobStatusChanged { job_id, epoch: 7, .. } if job_id == *job)
            );
        }
        let (channel, payload) = &messages[3];
        assert_eq!(channel, &Channel::Org(org));
        let Event::JobStatusesChanged { changes } = event_of(payload) else {
            panic!("expected a batch");
        };
        let batched: Vec<JobId> = changes.iter().map(|c| c.job_id).collect();
        assert_eq!(batched, jobs);
    }
}
