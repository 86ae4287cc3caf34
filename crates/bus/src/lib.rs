//! The Redis event bus. It carries wake-ups and live fan-out only:
//! everything on it is also in PostgreSQL, so a lost message costs latency,
//! never data. Producers publish *after* their transaction commits.
//!
//! Every key and channel starts with the configured prefix
//! (`REDIS_KEY_PREFIX`), so several deployments, or parallel tests, can
//! share one Redis.

pub mod metrics;

use std::time::Duration;

use domain::events::Envelope;
use domain::{AgentId, JobId, OrgId};
use futures_util::{Stream, StreamExt};
use redis::AsyncCommands;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

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
    fn suffix(&self) -> String {
        match self {
            Channel::SchedulerWake => "scheduler:wake".to_owned(),
            Channel::Job(id) => format!("job:{id}"),
            Channel::Org(id) => format!("org:{id}"),
            Channel::Agent(id) => format!("agent:{id}"),
        }
    }
}

/// Connection settings.
#[derive(Clone, Debug)]
pub struct BusConfig {
    pub url: String,
    pub prefix: String,
    /// Per-command timeout; also bounds how long a readiness probe waits.
    pub command_timeout: Duration,
}

impl BusConfig {
    pub fn new(url: impl Into<String>, prefix: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            prefix: prefix.into(),
            command_timeout: Duration::from_secs(1),
        }
    }
}

/// A handle on Redis: cheap to clone. Commands reconnect by themselves
/// after Redis comes back.
#[derive(Clone)]
pub struct Bus {
    client: redis::Client,
    conn: ConnectionManager,
    prefix: String,
}

impl Bus {
    /// Prepares the connection without opening it, so a service can start
    /// (and report not-ready) while Redis is down. Fails only on a bad URL.
    /// Call it inside a Tokio runtime.
    pub fn connect(config: &BusConfig) -> BusResult<Self> {
        let client = redis::Client::open(config.url.as_str())?;
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(config.command_timeout))
            .set_response_timeout(Some(config.command_timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let conn = ConnectionManager::new_lazy_with_config(client.clone(), manager_config)?;
        Ok(Self {
            client,
            conn,
            prefix: config.prefix.clone(),
        })
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The full Redis name of a channel.
    pub fn channel_name(&self, channel: &Channel) -> String {
        format!("{}{}", self.prefix, channel.suffix())
    }

    /// The full Redis name of a key.
    pub fn key(&self, suffix: &str) -> String {
        format!("{}{}", self.prefix, suffix)
    }

    /// A connection for commands (keys, counters) beyond publish.
    pub fn connection(&self) -> ConnectionManager {
        self.conn.clone()
    }

    pub async fn ping(&self) -> BusResult<()> {
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
            Ok(conn.publish(self.channel_name(channel), payload).await?)
        })
        .await
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
        let domain::events::Event::JobStatusChanged { job_id, .. } = &envelope.event else {
            return;
        };
        let payload = match serde_json::to_string(envelope) {
            Ok(payload) => payload,
            Err(error) => {
                tracing::error!(error = %error, "cannot encode a status event");
                return;
            }
        };
        let job = Channel::Job(*job_id);
        let org = Channel::Org(envelope.org_id.clone());
        let (a, b) = futures_util::join!(
            self.publish_raw(&job, payload.clone()),
            self.publish_raw(&org, payload)
        );
        if let Err(error) = a.and(b) {
            tracing::warn!(error = %error, job.id = %job_id, "status event not published; readers catch up from PostgreSQL");
        }
    }

    /// Subscribes to `channels` on a dedicated connection. The stream ends
    /// when the connection drops; callers resubscribe and backfill from
    /// PostgreSQL. Messages that do not parse are skipped with a warning.
    pub async fn subscribe(
        &self,
        channels: &[Channel],
    ) -> BusResult<impl Stream<Item = Envelope> + use<>> {
        let mut pubsub = self.client.get_async_pubsub().await?;
        for channel in channels {
            pubsub.subscribe(self.channel_name(channel)).await?;
        }
        let events = pubsub
            .into_on_message()
            .filter_map(|message| futures_util::future::ready(parse(&message)));
        Ok(metrics::Counted::new(events, channels.len()))
    }
}

fn parse(message: &redis::Msg) -> Option<Envelope> {
    let payload: String = message.get_payload().ok()?;
    match serde_json::from_str::<Envelope>(&payload) {
        Ok(envelope) => Some(envelope),
        Err(error) => {
            tracing::warn!(error = %error, channel = message.get_channel_name(), "skipping malformed event");
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
    fn a_bad_url_is_refused_at_once() {
        assert!(Bus::connect(&BusConfig::new("not a url", "sy:")).is_err());
    }
}
