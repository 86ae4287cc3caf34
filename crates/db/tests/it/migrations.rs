//! Embedded migrations: idempotent, and safe to run from several replicas
//! at once.

use diesel::migration::MigrationSource;
use diesel::pg::Pg;
use diesel::sql_query;
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use test_support::TestDb;

use crate::support;

/// The maintenance database tests may create databases through, as
/// `test_support` reads it.
fn admin_url() -> String {
    std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres:postgres@127.0.0.1:5432/postgres".to_owned())
}

fn url_for(database: &str) -> String {
    let admin = admin_url();
    let (base, query) = match admin.split_once('?') {
        Some((base, query)) => (base.to_owned(), Some(query.to_owned())),
        None => (admin.clone(), None),
    };
    let prefix = base
        .rsplit_once('/')
        .map_or(base.as_str(), |(prefix, _)| prefix);
    match query {
        Some(q) => format!("{prefix}/{database}?{q}"),
        None => format!("{prefix}/{database}"),
    }
}

/// An empty database, dropped when the guard goes out of scope (even if
/// the test fails).
struct EmptyDb {
    name: String,
}

impl EmptyDb {
    async fn create() -> Self {
        let name = format!("switchyard_empty_{}", uuid::Uuid::new_v4().simple());
        let mut admin = AsyncPgConnection::establish(&admin_url())
            .await
            .expect("admin connection");
        sql_query(format!("CREATE DATABASE \"{name}\""))
            .execute(&mut admin)
            .await
            .expect("create database");
        Self { name }
    }

    fn url(&self) -> String {
        url_for(&self.name)
    }
}

impl Drop for EmptyDb {
    fn drop(&mut self) {
        let name = std::mem::take(&mut self.name);
        let cleanup = std::thread::spawn(move || {
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
        let _ = cleanup.join();
    }
}

fn migration_count() -> usize {
    MigrationSource::<Pg>::migrations(&db::MIGRATIONS)
        .expect("embedded migrations")
        .len()
}

#[tokio::test(flavor = "multi_thread")]
async fn migrating_an_already_migrated_database_applies_nothing() {
    let test_db = TestDb::new().await;

    let applied = db::run_migrations(test_db.url()).await.expect("migrate");

    assert_eq!(applied, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_migrators_apply_each_migration_exactly_once() {
    let empty = EmptyDb::create().await;
    let expected = migration_count();
    assert!(expected >= 1);

    let migrate = |url: String| tokio::spawn(async move { db::run_migrations(&url).await });
    let (a, b) = tokio::join!(migrate(empty.url()), migrate(empty.url()));

    let (a, b) = (
        a.expect("join").expect("migrator a"),
        b.expect("join").expect("migrator b"),
    );
    assert_eq!(a + b, expected, "applied {a} + {b}");
    assert!(a == 0 || b == 0, "one migrator found nothing left to do");
    let mut conn = AsyncPgConnection::establish(&empty.url())
        .await
        .expect("connect");
    assert_eq!(
        support::count(
            &mut conn,
            "SELECT count(*) AS count FROM __diesel_schema_migrations"
        )
        .await,
        expected as i64
    );
    assert_eq!(
        support::count(
            &mut conn,
            "SELECT count(DISTINCT version) AS count FROM __diesel_schema_migrations"
        )
        .await,
        expected as i64
    );
    assert_eq!(
        support::count(
            &mut conn,
            "SELECT count(*) AS count FROM information_schema.tables \
             WHERE table_schema = 'public' AND table_name IN ('jobs', 'job_logs', 'agents')"
        )
        .await,
        3,
        "the schema is in place"
    );
    drop(conn);
    assert_eq!(db::run_migrations(&empty.url()).await.expect("again"), 0);
}
