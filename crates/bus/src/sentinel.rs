//! Redis Sentinel: finding the current primary and keeping the bus on it.
//!
//! Every connection the bus opens under [`Topology::Sentinel`](crate::Topology)
//! asks the Sentinels for the primary first, through the `redis` crate's
//! `SentinelClient`: it asks the Sentinels for their masters
//! (`SENTINEL MASTERS`, up to three at once, answers taken in the configured
//! order), skips a master flagged down, and confirms with `ROLE` on the
//! named node that it really is a primary, since a Sentinel can lag behind
//! a failover. Nothing remembers the address between connections, so after
//! a failover every reconnect lands on the new primary.
//!
//! A connection is given up, and the next command resolves again, when it
//! breaks (I/O error, timeout) or when its node answers `READONLY`: the node
//! was demoted to a replica, and retrying there would fail forever. Sentinel
//! also kills the old primary's client connections when it demotes it,
//! which ends pub/sub streams so callers backfill from PostgreSQL.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType};
use redis::{ConnectionAddr, IntoConnectionInfo, RedisConnectionInfo, RedisError, RedisResult};

/// Asks the Sentinels for the primary of one master name.
pub(crate) struct Sentinels {
    client: tokio::sync::Mutex<SentinelClient>,
    master: String,
    /// The database named in the URLs, selected on the primary.
    db: i64,
    timeout: Duration,
}

impl Sentinels {
    /// `urls` are the Sentinels' addresses. Their password, database and TLS
    /// settings are the data nodes' (the primary is reached with them);
    /// the Sentinels themselves get `sentinel_password` (none when unset)
    /// and no database, since a Sentinel has no keyspace.
    pub(crate) fn new(
        urls: &[String],
        master: &str,
        sentinel_password: Option<&str>,
        timeout: Duration,
    ) -> RedisResult<Self> {
        let Some(first) = urls.first() else {
            return Err(config_error("no Redis Sentinel address given"));
        };
        if master.trim().is_empty() {
            return Err(config_error("no Redis Sentinel master name given"));
        }
        let data_node = first.as_str().into_connection_info()?;
        let mut node = SentinelNodeConnectionInfo::default()
            .set_redis_connection_info(data_node.redis_settings().clone());
        if let ConnectionAddr::TcpTls { insecure, .. } = data_node.addr() {
            node = node.set_tls_mode(if *insecure {
                redis::TlsMode::Insecure
            } else {
                redis::TlsMode::Secure
            });
        }
        let mut sentinel_settings = RedisConnectionInfo::default();
        if let Some(password) = sentinel_password {
            sentinel_settings = sentinel_settings.set_password(password);
        }
        let sentinels = urls
            .iter()
            .map(|url| {
                Ok(url
                    .as_str()
                    .into_connection_info()?
                    .set_redis_settings(sentinel_settings.clone()))
            })
            .collect::<RedisResult<Vec<_>>>()?;
        let client = SentinelClient::build(
            sentinels,
            master.to_owned(),
            Some(node),
            SentinelServerType::Master,
        )?;
        Ok(Self {
            client: tokio::sync::Mutex::new(client),
            master: master.to_owned(),
            db: data_node.redis_settings().db(),
            timeout,
        })
    }

    /// A client for the current primary, confirmed by `ROLE`. Bounded by
    /// the command timeout so a readiness probe never hangs on a Sentinel
    /// that does not answer.
    pub(crate) async fn primary(&self) -> RedisResult<redis::Client> {
        let lookup = async { self.client.lock().await.async_get_client().await };
        match tokio::time::timeout(self.timeout, lookup).await {
            Ok(Ok(client)) => Ok(client),
            Ok(Err(error)) => Err(RedisError::from((
                error.kind(),
                "no Redis primary found through the Sentinels",
                format!("master {:?}: {error}", self.master),
            ))),
            Err(_) => Err(RedisError::from((
                redis::ErrorKind::Io,
                "no Redis primary found through the Sentinels",
                format!(
                    "master {:?}: no answer within {} ms",
                    self.master,
                    self.timeout.as_millis()
                ),
            ))),
        }
    }
}

fn config_error(message: &'static str) -> RedisError {
    RedisError::from((redis::ErrorKind::InvalidClientConfig, message))
}

/// The command connection under Sentinel: one multiplexed connection to
/// the primary, opened on first use (so a service starts, and reports
/// not-ready, while no primary is reachable) and forgotten when it breaks
/// or its node turned replica.
pub struct SentinelPrimary {
    sentinels: std::sync::Arc<Sentinels>,
    /// The connection in use and its generation: a failed command forgets
    /// the connection only if no other command has replaced it meanwhile.
    current: tokio::sync::Mutex<Option<(u64, MultiplexedConnection)>>,
    generations: AtomicU64,
    config: redis::AsyncConnectionConfig,
}

/// What a command's outcome says about the connection it ran on.
enum Verdict {
    Keep,
    /// The connection is broken: forget it; the command's fate is unknown,
    /// so it is not repeated (a duplicate publish is worse than a lost one,
    /// which the sweeps repair).
    Forget,
    /// The node is a replica now and refused the command: forget the
    /// connection and run the command once more on the resolved primary.
    ForgetAndRetry,
}

/// A raw reply, which may carry a server error such as `READONLY`.
pub(crate) trait Reply {
    fn readonly(&self) -> Option<RedisError>;
}

fn readonly_error(value: &redis::Value) -> Option<RedisError> {
    match value {
        redis::Value::ServerError(error)
            if error.kind() == Some(redis::ServerErrorKind::ReadOnly) =>
        {
            Some(error.clone().into())
        }
        _ => None,
    }
}

impl Reply for redis::Value {
    fn readonly(&self) -> Option<RedisError> {
        readonly_error(self)
    }
}

/// A pipeline's replies: one `READONLY` among them means the node is a
/// replica (no write of the pipeline ran there).
impl Reply for Vec<redis::Value> {
    fn readonly(&self) -> Option<RedisError> {
        self.iter().find_map(readonly_error)
    }
}

fn verdict(error: &RedisError) -> Verdict {
    if error.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::ReadOnly) {
        Verdict::ForgetAndRetry
    } else if error.is_io_error()
        || error.is_connection_dropped()
        || error.is_unrecoverable_error()
        || error.is_timeout()
    {
        Verdict::Forget
    } else {
        Verdict::Keep
    }
}

impl SentinelPrimary {
    pub(crate) fn new(sentinels: std::sync::Arc<Sentinels>, timeout: Duration) -> Self {
        Self {
            sentinels,
            current: tokio::sync::Mutex::new(None),
            generations: AtomicU64::new(0),
            config: redis::AsyncConnectionConfig::new()
                .set_connection_timeout(Some(timeout))
                .set_response_timeout(Some(timeout)),
        }
    }

    pub(crate) fn db(&self) -> i64 {
        self.sentinels.db
    }

    /// The connection in use, resolving and opening one if there is none.
    /// The lock is held while resolving so concurrent commands wait for one
    /// resolution instead of each asking the Sentinels.
    async fn get(&self) -> RedisResult<(u64, MultiplexedConnection)> {
        let mut current = self.current.lock().await;
        if let Some((generation, conn)) = current.as_ref() {
            return Ok((*generation, conn.clone()));
        }
        let client = self.sentinels.primary().await?;
        let conn = client
            .get_multiplexed_async_connection_with_config(&self.config)
            .await?;
        let generation = self.generations.fetch_add(1, Ordering::Relaxed) + 1;
        *current = Some((generation, conn.clone()));
        Ok((generation, conn))
    }

    async fn forget(&self, generation: u64) {
        let mut current = self.current.lock().await;
        if current.as_ref().is_some_and(|(g, _)| *g == generation) {
            *current = None;
        }
    }

    /// Runs one request through the primary, applying [`verdict`].
    pub(crate) async fn run<T, F, Fut>(&self, request: F) -> RedisResult<T>
    where
        T: Reply,
        F: Fn(MultiplexedConnection) -> Fut,
        Fut: std::future::Future<Output = RedisResult<T>>,
    {
        let mut retried = false;
        loop {
            let (generation, conn) = self.get().await?;
            let error = match request(conn).await {
                // An error reply arrives as a value (the caller converts it
                // later), so READONLY is looked for inside the reply.
                Ok(reply) => match reply.readonly() {
                    None => return Ok(reply),
                    Some(error) => error,
                },
                Err(error) => error,
            };
            match verdict(&error) {
                Verdict::Keep => return Err(error),
                Verdict::Forget => {
                    self.forget(generation).await;
                    return Err(error);
                }
                Verdict::ForgetAndRetry => {
                    self.forget(generation).await;
                    tracing::warn!(master = %self.sentinels.master,
                        "the Redis node answered READONLY (demoted by a failover); asking the Sentinels again");
                    if retried {
                        return Err(error);
                    }
                    retried = true;
                }
            }
        }
    }

    /// Readiness: the node in use must still be a primary. `PING` alone
    /// would pass on a demoted node, so this asks `ROLE` and forgets a
    /// connection to a replica; the next probe resolves again.
    pub(crate) async fn check_primary(&self) -> RedisResult<()> {
        let (generation, mut conn) = self.get().await?;
        let role = match redis::cmd("ROLE")
            .query_async::<redis::Role>(&mut conn)
            .await
        {
            Ok(role) => role,
            Err(error) => {
                if !matches!(verdict(&error), Verdict::Keep) {
                    self.forget(generation).await;
                }
                return Err(error);
            }
        };
        if matches!(role, redis::Role::Primary { .. }) {
            Ok(())
        } else {
            self.forget(generation).await;
            Err(RedisError::from((
                redis::ErrorKind::Server(redis::ServerErrorKind::ReadOnly),
                "the Redis node in use is no longer the primary; asking the Sentinels again",
            )))
        }
    }

    /// A pub/sub connection to the current primary.
    pub(crate) async fn pubsub(&self) -> RedisResult<redis::aio::PubSub> {
        let client = self.sentinels.primary().await?;
        tokio::time::timeout(self.sentinels.timeout, client.get_async_pubsub())
            .await
            .map_err(|_| {
                RedisError::from((
                    redis::ErrorKind::Io,
                    "the Redis primary did not accept a pub/sub connection in time",
                ))
            })?
    }
}
