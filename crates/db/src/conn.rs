//! The connection every statement runs on, and how it behaves behind a
//! transaction pooler.
//!
//! diesel-async sends each statement in two round trips (prepare a named
//! statement, then bind and execute it). A pooler in transaction mode, such
//! as PgBouncer with `pool_mode = transaction`, may hand those two round trips
//! to different server connections unless a transaction is open, and a cached
//! statement prepared on one server does not exist on the next. So in
//! transaction-pooling mode a connection caches no statements and runs every
//! statement that is not already inside a transaction in one of its own
//! (`BEGIN`, statement, `COMMIT`), which pins it to one server connection.

use std::sync::atomic::{AtomicBool, Ordering};

use diesel::QueryResult;
use diesel::connection::{CacheSize, Instrumentation};
use diesel::pg::Pg;
use diesel::query_builder::{AsQuery, QueryFragment, QueryId};
use diesel_async::pooled_connection::PoolableConnection;
use diesel_async::{
    AnsiTransactionManager, AsyncConnection, AsyncConnectionCore, AsyncPgConnection,
    SimpleAsyncConnection, TransactionManager,
};
use futures_util::future::BoxFuture;
use futures_util::stream::BoxStream;
use futures_util::{FutureExt, StreamExt, TryStreamExt};

use crate::cached::CacheStatement;

type PgRow = <AsyncPgConnection as AsyncConnectionCore>::Row<'static, 'static>;

/// Planner settings of [`PgConn::keyed_transaction`].
const KEYED_PLANNING: &str = "SET LOCAL enable_seqscan = off; SET LOCAL enable_bitmapscan = off; \
    SET LOCAL enable_hashjoin = off; SET LOCAL enable_mergejoin = off";

/// A PostgreSQL connection (see the module docs for transaction pooling).
pub struct PgConn {
    inner: AsyncPgConnection,
    transaction_pooling: bool,
    /// Set while a statement's own transaction is open: if its future is
    /// dropped half-way the connection is left inside a transaction diesel
    /// does not know of, so the pool must discard it.
    implicit_transaction_open: AtomicBool,
    /// Set when a pipelined transaction's `COMMIT` went out behind its
    /// statements ([`PgConn::commit_behind`]).
    commit_sent: AtomicBool,
}

impl PgConn {
    /// Opens a connection directly, caching prepared statements.
    pub async fn connect(url: &str) -> diesel::ConnectionResult<Self> {
        Ok(Self::wrap(AsyncPgConnection::establish(url).await?, false))
    }

    /// Opens a connection through a transaction pooler.
    pub async fn connect_through_pooler(url: &str) -> diesel::ConnectionResult<Self> {
        use diesel::result::ConnectionError;
        let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .map_err(|e| ConnectionError::BadConnection(e.to_string()))?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "PostgreSQL connection ended");
            }
        });
        // diesel-async's connection setup runs its session settings as
        // prepared statements; inside a transaction they reach one server.
        client
            .batch_execute("BEGIN")
            .await
            .map_err(|e| ConnectionError::BadConnection(e.to_string()))?;
        let mut inner = AsyncPgConnection::try_from(client).await?;
        inner
            .batch_execute("COMMIT")
            .await
            .map_err(ConnectionError::CouldntSetupConfiguration)?;
        Ok(Self::wrap(inner, true))
    }

    fn wrap(mut inner: AsyncPgConnection, transaction_pooling: bool) -> Self {
        if transaction_pooling {
            inner.set_prepared_statement_cache_size(CacheSize::Disabled);
        }
        Self {
            inner,
            transaction_pooling,
            implicit_transaction_open: AtomicBool::new(false),
            commit_sent: AtomicBool::new(false),
        }
    }

    /// The connection for statements sent together: queries issued through
    /// separate `&mut` copies of this reference and polled concurrently go
    /// out in one pipeline (one round trip), and run in the order sent.
    /// Only inside a transaction: behind a transaction pooler that is what
    /// keeps them on one server connection.
    pub fn pipeline(&self) -> &AsyncPgConnection {
        &self.inner
    }

    /// Runs `statements`, issued through [`pipeline`](Self::pipeline), in a
    /// transaction whose `BEGIN` is sent first but not awaited on its own:
    /// the statements queue behind it on the connection. `COMMIT` once they
    /// all succeeded, `ROLLBACK` otherwise.
    pub async fn pipelined_transaction<R, E>(
        &self,
        statements: impl Future<Output = Result<R, E>>,
    ) -> Result<R, E>
    where
        E: From<diesel::result::Error>,
    {
        let mut for_begin = &self.inner;
        self.implicit_transaction_open.store(true, Ordering::SeqCst);
        let begin = async move { for_begin.batch_execute("BEGIN").await.map_err(E::from) };
        let outcome = futures_util::try_join!(begin, statements).map(|((), value)| value);
        self.end_own_transaction(outcome).await
    }

    /// Runs `statement`, issued through [`pipeline`](Self::pipeline), in a
    /// pipelined transaction whose plans find rows through indexes and join
    /// by nested loop, its `COMMIT` sent behind it (see
    /// [`commit_behind`](Self::commit_behind)): one round trip in all.
    ///
    /// For single statements that find their rows by key from a list of
    /// ids. Their prepared statements keep a generic plan, made the first
    /// time with the statistics of then: made while `jobs` was nearly empty,
    /// it reads the whole table for each batch (10 ms per success batch with
    /// 3,000 jobs, and growing, until an analyze of the table replaces the
    /// plan). Index probes are right whatever the table's size, so the plan
    /// is made with nothing else allowed. Pass an `async` block, so that its
    /// statement is issued after `BEGIN` and the settings.
    pub async fn keyed_transaction<R, E>(
        &self,
        statement: impl Future<Output = Result<R, E>>,
    ) -> Result<R, E>
    where
        E: From<diesel::result::Error>,
    {
        let mut for_planning = &self.inner;
        self.pipelined_transaction(async move {
            let planning = async move {
                for_planning
                    .batch_execute(KEYED_PLANNING)
                    .await
                    .map_err(E::from)
            };
            let commit = async { self.commit_behind().await.map_err(E::from) };
            futures_util::try_join!(planning, statement, commit).map(|((), value, ())| value)
        })
        .await
    }

    /// `COMMIT` for a [`pipelined_transaction`](Self::pipelined_transaction)
    /// whose last statements are in flight: polled after them (last in the
    /// same `try_join!`), it goes out behind them instead of after their
    /// answers, one round trip fewer. diesel-async prepares and sends a
    /// statement under one lock, which this prepared `COMMIT` queues on
    /// too, so it never overtakes a statement still being prepared. Only
    /// for statements whose answers cannot call the transaction off:
    /// PostgreSQL commits what it ran (a statement it refuses aborts the
    /// transaction, and this `COMMIT` then rolls back). Behind a transaction
    /// pooler it does nothing, and the transaction commits after the
    /// answers as before.
    pub async fn commit_behind(&self) -> QueryResult<()> {
        if self.transaction_pooling {
            return Ok(());
        }
        use diesel_async::RunQueryDsl;
        self.commit_sent.store(true, Ordering::SeqCst);
        let mut conn = &self.inner;
        diesel::sql_query("COMMIT")
            .cached()
            .execute(&mut conn)
            .await
            .map(|_| ())
    }

    /// Ends a transaction this connection opened itself: `COMMIT` after
    /// `outcome` succeeded, `ROLLBACK` otherwise. Once either went through
    /// the connection is clean again for the pool.
    async fn end_own_transaction<R, E>(&self, outcome: Result<R, E>) -> Result<R, E>
    where
        E: From<diesel::result::Error>,
    {
        let mut conn = &self.inner;
        let committed_behind = self.commit_sent.swap(false, Ordering::SeqCst);
        let (result, ended) = match outcome {
            Ok(value) if committed_behind => (Ok(value), true),
            Ok(value) => match conn.batch_execute("COMMIT").await {
                Ok(()) => (Ok(value), true),
                Err(e) => (Err(e.into()), false),
            },
            // A COMMIT sent behind the statements may have ended the
            // transaction already; PostgreSQL then only warns.
            Err(e) => (Err(e), conn.batch_execute("ROLLBACK").await.is_ok()),
        };
        if ended {
            self.implicit_transaction_open
                .store(false, Ordering::SeqCst);
        }
        result
    }

    fn needs_own_transaction(&mut self) -> bool {
        self.transaction_pooling
            && !matches!(
                AnsiTransactionManager::transaction_manager_status_mut(&mut self.inner)
                    .transaction_depth(),
                Ok(Some(_))
            )
    }

    /// Runs `statement` (already bound to the connection through a shared
    /// reference, so nothing is sent until it is polled) between `BEGIN`
    /// and `COMMIT`, rolling back on error.
    fn in_own_transaction<'conn, R: Send + 'conn>(
        &'conn self,
        statement: BoxFuture<'conn, QueryResult<R>>,
    ) -> BoxFuture<'conn, QueryResult<R>> {
        let mut conn = &self.inner;
        async move {
            self.implicit_transaction_open.store(true, Ordering::SeqCst);
            conn.batch_execute("BEGIN").await?;
            let outcome = statement.await;
            self.end_own_transaction(outcome).await
        }
        .boxed()
    }
}

impl SimpleAsyncConnection for PgConn {
    async fn batch_execute(&mut self, query: &str) -> QueryResult<()> {
        self.inner.batch_execute(query).await
    }
}

impl AsyncConnectionCore for PgConn {
    type ExecuteFuture<'conn, 'query> = BoxFuture<'conn, QueryResult<usize>>;
    type LoadFuture<'conn, 'query> = BoxFuture<'conn, QueryResult<Self::Stream<'conn, 'query>>>;
    type Stream<'conn, 'query> = BoxStream<'static, QueryResult<PgRow>>;
    type Row<'conn, 'query> = PgRow;
    type Backend = Pg;

    fn load<'conn, 'query, T>(&'conn mut self, source: T) -> Self::LoadFuture<'conn, 'query>
    where
        T: AsQuery + 'query,
        T::Query: QueryFragment<Pg> + QueryId + 'query,
    {
        if !self.needs_own_transaction() {
            return self.inner.load(source);
        }
        let this: &'conn Self = self;
        let mut shared = &this.inner;
        let load = shared.load(source);
        // The rows are read before COMMIT, so the stream handed back owns them.
        let rows = async move { load.await?.try_collect::<Vec<_>>().await }.boxed();
        this.in_own_transaction(rows)
            .map(|rows| {
                rows.map(|rows| futures_util::stream::iter(rows.into_iter().map(Ok)).boxed())
            })
            .boxed()
    }

    fn execute_returning_count<'conn, 'query, T>(
        &'conn mut self,
        source: T,
    ) -> Self::ExecuteFuture<'conn, 'query>
    where
        T: QueryFragment<Pg> + QueryId + 'query,
    {
        if !self.needs_own_transaction() {
            return self.inner.execute_returning_count(source);
        }
        let this: &'conn Self = self;
        let mut shared = &this.inner;
        let execute = shared.execute_returning_count(source);
        this.in_own_transaction(execute)
    }
}

impl AsyncConnection for PgConn {
    type TransactionManager = AnsiTransactionManager;

    async fn establish(url: &str) -> diesel::ConnectionResult<Self> {
        Self::connect(url).await
    }

    fn transaction_state(&mut self) -> &mut AnsiTransactionManager {
        self.inner.transaction_state()
    }

    fn instrumentation(&mut self) -> &mut dyn Instrumentation {
        self.inner.instrumentation()
    }

    fn set_instrumentation(&mut self, instrumentation: impl Instrumentation) {
        self.inner.set_instrumentation(instrumentation);
    }

    fn set_prepared_statement_cache_size(&mut self, size: CacheSize) {
        // Behind a transaction pooler a cached statement would be looked up
        // on whichever server the next transaction lands on.
        if !self.transaction_pooling {
            self.inner.set_prepared_statement_cache_size(size);
        }
    }
}

impl PoolableConnection for PgConn {
    fn is_broken(&mut self) -> bool {
        *self.implicit_transaction_open.get_mut() || self.inner.is_broken()
    }
}
