//! Behind PgBouncer in transaction pooling mode (`TEST_PGBOUNCER_URL`,
//! started by `scripts/pgbouncer.sh`): statements prepared and executed in
//! separate round trips only reach one server inside a transaction.

use std::time::Duration;

use std::collections::BTreeSet;

use diesel::sql_types::{Integer, Text};
use diesel_async::{AsyncConnection, RunQueryDsl};
use test_support::TestDb;

use crate::support;

#[derive(diesel::QueryableByName)]
struct Echo {
    #[diesel(sql_type = Text)]
    text: String,
    #[diesel(sql_type = Integer)]
    backend: i32,
}

/// Runs `rounds` parameterised statements on each of 16 concurrent pooled
/// connections (a read, a write and a small transaction per round) and
/// returns the errors they got and the server processes that answered.
async fn hammer(
    test_db: &TestDb,
    transaction_pooling: bool,
    rounds: usize,
) -> (Vec<String>, BTreeSet<i32>) {
    let mut config = db::PoolConfig::new(test_db.url());
    config.transaction_pooling = transaction_pooling;
    config.max_size = 16;
    config.acquire_timeout = Duration::from_secs(20);
    let pool = db::Db::connect(&config).expect("pool");
    let tasks = (0..16).map(|worker| {
        let pool = pool.clone();
        tokio::spawn(async move {
            let mut errors = Vec::new();
            let mut backends = BTreeSet::new();
            let mut conn = match pool.conn().await {
                Ok(conn) => conn,
                Err(e) => return (vec![e.to_string()], backends),
            };
            for round in 0..rounds {
                let text = format!("{worker}/{round}");
                let echoed =
                    diesel::sql_query("SELECT $1::text AS text, pg_backend_pid() AS backend")
                        .bind::<Text, _>(&text)
                        .get_result::<Echo>(&mut conn)
                        .await;
                match echoed {
                    Ok(echo) if echo.text == text => {
                        backends.insert(echo.backend);
                    }
                    Ok(echo) => errors.push(format!("asked {text}, got {}", echo.text)),
                    Err(e) => errors.push(e.to_string()),
                }
                let written = diesel::sql_query("UPDATE orgs SET name = name WHERE id <> $1")
                    .bind::<Text, _>("none")
                    .execute(&mut conn)
                    .await;
                if let Err(e) = written {
                    errors.push(e.to_string());
                }
                let in_transaction = conn
                    .transaction(async |conn| {
                        diesel::sql_query("SELECT $1::text AS text, pg_backend_pid() AS backend")
                            .bind::<Text, _>("tx")
                            .get_result::<Echo>(conn)
                            .await
                    })
                    .await;
                if let Err(e) = in_transaction {
                    errors.push(e.to_string());
                }
            }
            (errors, backends)
        })
    });
    let mut errors = Vec::new();
    let mut backends = BTreeSet::new();
    for task in tasks.collect::<Vec<_>>() {
        let (more_errors, more_backends) = task.await.expect("worker");
        errors.extend(more_errors);
        backends.extend(more_backends);
    }
    (errors, backends)
}

/// A test database reached through the pooler, with an org to write to;
/// `None` (and a notice) when no pooler is under test.
async fn pooled_database() -> Option<TestDb> {
    let test_db = TestDb::new().await;
    if !test_db.transaction_pooling() {
        eprintln!("skipped: TEST_PGBOUNCER_URL is not set (scripts/test-topologies.sh sets it)");
        return None;
    }
    let mut conn = test_db.conn().await;
    support::acme(&mut conn).await;
    drop(conn);
    Some(test_db)
}

#[tokio::test(flavor = "multi_thread")]
async fn statements_through_a_transaction_pooler_all_succeed() {
    let Some(test_db) = pooled_database().await else {
        return;
    };
    let (errors, backends) = hammer(&test_db, true, 100).await;
    assert!(
        errors.is_empty(),
        "{} errors, first: {:?}",
        errors.len(),
        errors.as_slice().first()
    );
    assert!(
        backends.len() > 1,
        "the pooler shared its server connections: {backends:?}"
    );
}

/// Shows the pooler under test really hands statements to other server
/// connections between round trips, so the test above proves something.
#[tokio::test(flavor = "multi_thread")]
async fn a_connection_unaware_of_the_pooler_fails_behind_it() {
    let Some(test_db) = pooled_database().await else {
        return;
    };
    let (errors, _) = hammer(&test_db, false, 100).await;
    assert!(
        errors.iter().any(|e| e.contains("prepared statement")),
        "expected lost prepared statements, got {} errors: {:?}",
        errors.len(),
        errors.as_slice().first()
    );
}
