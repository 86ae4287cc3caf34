use diesel::sql_query;
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use tokio::sync::OnceCell;

/// Server-wide lock so parallel test processes build a template only once.
const TEMPLATE_LOCK_KEY: i64 = 0x5357_5944_5445_4D50; // "SWYDTEMP"

fn admin_url() -> String {
    std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres:postgres@127.0.0.1:5432/postgres".to_owned())
}

/// `TEST_PGBOUNCER_URL`: a PgBouncer in transaction pooling mode in front
/// of the `TEST_DATABASE_URL` server, serving every database (`*`). When set,
/// tests and the services they start reach their database through it, as
/// `DATABASE_TRANSACTION_POOLING=true` deployments do; creating, migrating
/// and dropping databases still go to PostgreSQL directly.
fn pooler_url() -> Option<String> {
    std::env::var("TEST_PGBOUNCER_URL")
        .ok()
        .filter(|url| !url.is_empty())
}

/// `admin_url` with its database name replaced.
fn url_for(database: &str) -> String {
    with_database(&admin_url(), database)
}

/// `url` with its database name replaced.
fn with_database(url: &str, database: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base.to_owned(), Some(query.to_owned())),
        None => (url.to_owned(), None),
    };
    let prefix = base
        .rsplit_once('/')
        .map_or(base.as_str(), |(prefix, _)| prefix);
    match query {
        Some(q) => format!("{prefix}/{database}?{q}"),
        None => format!("{prefix}/{database}"),
    }
}

fn template_name() -> String {
    format!("switchyard_template_{}", db::migrations_fingerprint())
}

/// Creates (once per schema version, across processes) the migrated template.
async fn ensure_template() -> String {
    static TEMPLATE: OnceCell<String> = OnceCell::const_new();
    TEMPLATE
        .get_or_init(|| async {
            let name = template_name();
            let mut admin = AsyncPgConnection::establish(&admin_url())
                .await
                .expect("connect to TEST_DATABASE_URL (is PostgreSQL running? `scripts/test.sh` starts it)");
            sql_query(format!("SELECT pg_advisory_lock({TEMPLATE_LOCK_KEY})"))
                .execute(&mut admin)
                .await
                .expect("template lock");
            #[derive(diesel::QueryableByName)]
            struct Exists {
                #[diesel(sql_type = diesel::sql_types::Bool)]
                exists: bool,
            }
            let exists: Exists = sql_query(
                "SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1 AND datistemplate) AS exists",
            )
            .bind::<diesel::sql_types::Text, _>(&name)
            .get_result(&mut admin)
            .await
            .expect("look up template");
            if !exists.exists {
                // A half-built template from a crashed run is not marked as a
                // template yet: drop it and start over.
                sql_query(format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                    .execute(&mut admin)
                    .await
                    .expect("drop stale template");
                sql_query(format!("CREATE DATABASE \"{name}\""))
                    .execute(&mut admin)
                    .await
                    .expect("create template");
                db::run_migrations(&url_for(&name))
                    .await
                    .expect("migrate template");
                sql_query(format!("ALTER DATABASE \"{name}\" WITH IS_TEMPLATE true ALLOW_CONNECTIONS false"))
                    .execute(&mut admin)
                    .await
                    .expect("mark template");
            }
            sql_query(format!("SELECT pg_advisory_unlock({TEMPLATE_LOCK_KEY})"))
                .execute(&mut admin)
                .await
                .expect("template unlock");
            name
        })
        .await
        .clone()
}

/// A fresh, migrated database for one test, dropped when it goes out of scope.
pub struct TestDb {
    name: String,
    url: String,
    direct_url: String,
    transaction_pooling: bool,
    db: db::Db,
}

impl TestDb {
    pub async fn new() -> Self {
        crate::init_tracing();
        let template = ensure_template().await;
        let name = format!("switchyard_test_{}", uuid::Uuid::new_v4().simple());
        let mut admin = AsyncPgConnection::establish(&admin_url())
            .await
            .expect("connect to TEST_DATABASE_URL");
        sql_query(format!(
            "CREATE DATABASE \"{name}\" TEMPLATE \"{template}\""
        ))
        .execute(&mut admin)
        .await
        .expect("clone template");
        let direct_url = url_for(&name);
        let pooler = pooler_url();
        let url = pooler
            .as_deref()
            .map_or_else(|| direct_url.clone(), |pooler| with_database(pooler, &name));
        let mut config = db::PoolConfig::new(&url);
        config.max_size = 8;
        config.transaction_pooling = pooler.is_some();
        config.migration_url = Some(direct_url.clone());
        let db = db::Db::connect(&config).expect("pool");
        Self {
            name,
            url,
            direct_url,
            transaction_pooling: config.transaction_pooling,
            db,
        }
    }

    pub fn db(&self) -> &db::Db {
        &self.db
    }

    /// Where services reach this database: through the pooler when
    /// `TEST_PGBOUNCER_URL` is set.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// PostgreSQL itself, for what cannot go through a transaction pooler.
    pub fn direct_url(&self) -> &str {
        &self.direct_url
    }

    /// Whether [`url`](Self::url) is a transaction pooler.
    pub fn transaction_pooling(&self) -> bool {
        self.transaction_pooling
    }

    /// The `DATABASE_*` environment a service process needs to use this
    /// database the way [`url`](Self::url) reaches it.
    pub fn env_vars(&self) -> [(&'static str, String); 3] {
        [
            ("DATABASE_URL", self.url.clone()),
            (
                "DATABASE_TRANSACTION_POOLING",
                self.transaction_pooling.to_string(),
            ),
            ("DATABASE_MIGRATION_URL", self.direct_url.clone()),
        ]
    }

    pub async fn conn(&self) -> db::PooledConn {
        self.db.conn().await.expect("test database connection")
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        drop_database(std::mem::take(&mut self.name));
    }
}

/// An empty database (no migrations), for tests of the migration path
/// itself; dropped when it goes out of scope, even if the test fails.
pub struct EmptyDb {
    name: String,
    url: String,
}

impl EmptyDb {
    pub async fn create() -> Self {
        let name = format!("switchyard_empty_{}", uuid::Uuid::new_v4().simple());
        let mut admin = AsyncPgConnection::establish(&admin_url())
            .await
            .expect("connect to TEST_DATABASE_URL");
        sql_query(format!("CREATE DATABASE \"{name}\""))
            .execute(&mut admin)
            .await
            .expect("create database");
        let url = url_for(&name);
        Self { name, url }
    }

    pub fn url(&self) -> &str {
        &self.url
    }
}

impl Drop for EmptyDb {
    fn drop(&mut self) {
        drop_database(std::mem::take(&mut self.name));
    }
}

/// Drops a test's database. Drop runs outside async: do it on a thread
/// of its own.
fn drop_database(name: String) {
    let handle = std::thread::spawn(move || {
        let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        runtime.block_on(async move {
            if let Ok(mut admin) = AsyncPgConnection::establish(&admin_url()).await {
                let _ = sql_query(format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                    .execute(&mut admin)
                    .await;
            }
        });
    });
    let _ = handle.join();
}
