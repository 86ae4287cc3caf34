use std::time::Duration;

use deadpool::Runtime;
use diesel::sql_query;
use diesel_async::RunQueryDsl;
use diesel_async::pooled_connection::deadpool::{Object, Pool};
use diesel_async::pooled_connection::{
    AsyncDieselConnectionManager, ManagerConfig, RecyclingMethod,
};
use futures_util::FutureExt;

use crate::{DbError, DbResult, PgConn};

/// A pooled connection.
pub type PooledConn = Object<PgConn>;

/// Pool settings; services read them from the environment.
#[derive(Clone, Debug)]
pub struct PoolConfig {
    pub url: String,
    pub max_size: usize,
    /// Longest wait for a free connection before reporting `Unavailable`.
    pub acquire_timeout: Duration,
    /// Longest wait to open a new connection.
    pub connect_timeout: Duration,
    /// `url` points at a pooler in transaction mode (PgBouncer
    /// `pool_mode = transaction`): see [`PgConn`].
    pub transaction_pooling: bool,
    /// Where migrations run when not at `url`: they hold a session-level
    /// advisory lock, so behind a transaction pooler they need PostgreSQL
    /// itself (or a session-mode pool).
    pub migration_url: Option<String>,
}

impl PoolConfig {
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            max_size: 16,
            acquire_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(3),
            transaction_pooling: false,
            migration_url: None,
        }
    }

    /// The URL migrations connect to.
    pub fn migration_url(&self) -> &str {
        self.migration_url.as_deref().unwrap_or(&self.url)
    }
}

/// A handle on the database: cheap to clone, shared by all tasks.
#[derive(Clone)]
pub struct Db {
    pool: Pool<PgConn>,
}

impl Db {
    /// Builds the pool. Connections open lazily, so a service starts (and
    /// reports not-ready) while PostgreSQL is still down.
    pub fn connect(config: &PoolConfig) -> DbResult<Self> {
        let mut manager_config = ManagerConfig::<PgConn>::default();
        // Checking a connection out does not cost a `SELECT 1` round trip:
        // a connection whose socket closed is discarded as broken, and any
        // other failure surfaces on the statement that meets it.
        manager_config.recycling_method = RecyclingMethod::Fast;
        if config.transaction_pooling {
            manager_config.custom_setup =
                Box::new(|url| PgConn::connect_through_pooler(url).boxed());
        }
        let manager = AsyncDieselConnectionManager::new_with_config(&config.url, manager_config);
        let pool = Pool::builder(manager)
            .max_size(config.max_size)
            .wait_timeout(Some(config.acquire_timeout))
            .create_timeout(Some(config.connect_timeout))
            .recycle_timeout(Some(config.connect_timeout))
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(|e| DbError::Unavailable(e.to_string()))?;
        Ok(Self { pool })
    }

    pub async fn conn(&self) -> DbResult<PooledConn> {
        self.pool
            .get()
            .await
            .map_err(|e| DbError::Unavailable(e.to_string()))
    }

    /// Answers when PostgreSQL does: used by `/readyz`.
    pub async fn ping(&self) -> DbResult<()> {
        let mut conn = self.conn().await?;
        sql_query("SELECT 1").execute(&mut conn).await?;
        Ok(())
    }

    /// Connections in use and the pool's size, for saturation metrics.
    pub fn pool_usage(&self) -> (usize, usize) {
        let status = self.pool.status();
        (
            status.size - status.available.min(status.size),
            status.max_size,
        )
    }
}
