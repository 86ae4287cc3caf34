use diesel::sql_query;
use diesel_async::{AsyncConnection, AsyncMigrationHarness, AsyncPgConnection, RunQueryDsl};
use diesel_migrations::{EmbeddedMigrations, MigrationHarness, embed_migrations};

use crate::{DbError, DbResult};

/// The SQL migrations in the repository's `migrations/`, compiled in.
pub const MIGRATIONS: EmbeddedMigrations = embed_migrations!("../../migrations");

/// Serializes concurrent migrators (several replicas started with
/// `MIGRATE_ON_START`) on one advisory lock.
const MIGRATION_LOCK_KEY: i64 = 0x5357_5944_4D49_4752; // "SWYDMIGR"

/// Applies pending migrations and returns how many ran. Needs the
/// multi-threaded Tokio runtime (the harness uses `block_in_place`).
/// Run it against PostgreSQL directly, not through a transaction pooler:
/// it holds a session-level advisory lock.
pub async fn run_migrations(url: &str) -> DbResult<usize> {
    let mut conn = AsyncPgConnection::establish(url)
        .await
        .map_err(|e| DbError::Unavailable(e.to_string()))?;
    sql_query(format!("SELECT pg_advisory_lock({MIGRATION_LOCK_KEY})"))
        .execute(&mut conn)
        .await?;
    let mut harness = AsyncMigrationHarness::new(conn);
    let applied = harness
        .run_pending_migrations(MIGRATIONS)
        .map(|versions| versions.len())
        .map_err(|e| DbError::Unavailable(format!("migration failed: {e}")));
    let mut conn = harness.into_inner();
    sql_query(format!("SELECT pg_advisory_unlock({MIGRATION_LOCK_KEY})"))
        .execute(&mut conn)
        .await?;
    applied
}

/// A fingerprint of the migration files' names and contents (computed by
/// `build.rs`), so test templates are rebuilt whenever the schema changes.
pub fn migrations_fingerprint() -> &'static str {
    env!("SWITCHYARD_MIGRATIONS_FINGERPRINT")
}
