//! Embedded migrations: idempotent, and safe to run from several replicas
//! at once.

use db::PgConn;
use diesel::migration::MigrationSource;
use diesel::pg::Pg;
use test_support::{EmptyDb, TestDb};

use crate::support;

fn migration_count() -> usize {
    MigrationSource::<Pg>::migrations(&db::MIGRATIONS)
        .expect("embedded migrations")
        .len()
}

#[tokio::test(flavor = "multi_thread")]
async fn migrating_an_already_migrated_database_applies_nothing() {
    let test_db = TestDb::new().await;

    let applied = db::run_migrations(test_db.direct_url())
        .await
        .expect("migrate");

    assert_eq!(applied, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_migrators_apply_each_migration_exactly_once() {
    let empty = EmptyDb::create().await;
    let expected = migration_count();
    assert!(expected >= 1);

    let migrate = |url: String| tokio::spawn(async move { db::run_migrations(&url).await });
    let (a, b) = tokio::join!(
        migrate(empty.url().to_owned()),
        migrate(empty.url().to_owned())
    );

    let (a, b) = (
        a.expect("join").expect("migrator a"),
        b.expect("join").expect("migrator b"),
    );
    assert_eq!(a + b, expected, "applied {a} + {b}");
    assert!(a == 0 || b == 0, "one migrator found nothing left to do");
    let mut conn = PgConn::connect(empty.url()).await.expect("connect");
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
    assert_eq!(db::run_migrations(empty.url()).await.expect("again"), 0);
}
