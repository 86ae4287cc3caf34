//! `PgConn::keyed_transaction`: BEGIN, planner settings, one statement and
//! COMMIT sent together.

use diesel::sql_types::Text;
use diesel_async::RunQueryDsl;
use test_support::TestDb;

use crate::support;

#[derive(diesel::QueryableByName)]
struct Seen {
    #[diesel(sql_type = Text)]
    seqscan: String,
}

/// diesel prepares an uncached statement on every run, so if COMMIT could
/// overtake a statement still being prepared, this one would run after it,
/// outside the transaction, and see the planner settings of outside.
#[tokio::test]
async fn a_keyed_statement_runs_inside_its_transaction_and_commits() {
    let test_db = TestDb::new().await;
    let pool = support::pool(&test_db, 1);
    support::acme(&mut *support::conn_from(&pool).await).await;
    for round in 0..3 {
        let conn = support::conn_from(&pool).await;
        let mut shared = conn.pipeline();
        let seen: Seen = conn
            .keyed_transaction(async {
                diesel::sql_query(
                    "UPDATE orgs SET name = name || '!' WHERE id = 'acme' \
                     RETURNING current_setting('enable_seqscan') AS seqscan",
                )
                .get_result::<Seen>(&mut shared)
                .await
                .map_err(db::DbError::from)
            })
            .await
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
        assert_eq!(
            seen.seqscan, "off",
            "round {round} ran outside its transaction"
        );
    }
    // Every round committed, visible on another connection.
    let mut other = test_db.conn().await;
    let renamed = "SELECT count(*) AS count FROM orgs WHERE id = 'acme' AND name LIKE '%!!!'";
    assert_eq!(support::count(&mut other, renamed).await, 1);
}

/// A statement PostgreSQL refuses leaves nothing behind, and the
/// connection comes back clean: outside any transaction, usable.
#[tokio::test]
async fn a_refused_keyed_statement_rolls_back_and_leaves_the_connection_usable() {
    let test_db = TestDb::new().await;
    let pool = support::pool(&test_db, 1);
    support::acme(&mut *support::conn_from(&pool).await).await;
    for round in 0..2 {
        let conn = support::conn_from(&pool).await;
        let mut shared = conn.pipeline();
        let refused = conn
            .keyed_transaction(async {
                diesel::sql_query(
                    "WITH renamed AS (UPDATE orgs SET name = 'renamed' WHERE id = 'acme' RETURNING id) \
                     INSERT INTO orgs (id, name) SELECT id, 'again' FROM renamed",
                )
                .execute(&mut shared)
                .await
                .map_err(db::DbError::from)
            })
            .await;
        assert!(
            refused.is_err(),
            "round {round}: a second acme must be refused"
        );
    }
    let mut conn = support::conn_from(&pool).await;
    // Inside the keyed transaction still, this would fail (aborted) or see
    // its planner settings.
    let in_transaction = "SELECT count(*) AS count WHERE current_setting('enable_seqscan') = 'off'";
    assert_eq!(support::count(&mut conn, in_transaction).await, 0);
    let renamed = "SELECT count(*) AS count FROM orgs WHERE name = 'renamed'";
    assert_eq!(support::count(&mut conn, renamed).await, 0);
}
