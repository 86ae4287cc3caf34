//! Agents: registration tokens admit a bounded number of agents, secrets are
//! stored only as hashes, and revocation is final.

use std::time::Duration;

use db::DbError;
use db::agents::{NewRegistrationToken, RegistrationRefused, RegistrationToken};
use diesel::sql_types::Text;
use diesel_async::RunQueryDsl;
use domain::agent::{AgentProfile, AgentStatus};
use domain::job::Labels;
use domain::{AgentId, DomainError, OrgId};
use test_support::TestDb;

use crate::support::{self, acme};

fn profile(name: &str) -> AgentProfile {
    AgentProfile {
        name: name.to_owned(),
        labels: Labels::new(["os=linux"]),
        capacity: 2,
        version: "1.2.3".to_owned(),
    }
}

async fn token(
    conn: &mut db::PgConn,
    org: &OrgId,
    max_uses: u32,
    labels: &Labels,
) -> (RegistrationToken, String) {
    db::agents::create_registration_token(
        conn,
        NewRegistrationToken {
            org,
            description: Some("ci fleet"),
            labels,
            max_uses,
            ttl: Duration::from_secs(3_600),
            created_by: "admin@acme",
        },
    )
    .await
    .expect("create token")
}

async fn register(
    conn: &mut db::PgConn,
    token: &str,
    name: &str,
) -> Result<db::agents::Registered, RegistrationRefused> {
    db::agents::register(conn, token, &profile(name))
        .await
        .expect("register")
}

/// Rows of `table` (as JSON text) containing `needle` anywhere.
async fn rows_containing(conn: &mut db::PgConn, table: &str, needle: &str) -> i64 {
    #[derive(diesel::QueryableByName)]
    struct Count {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        count: i64,
    }
    diesel::sql_query(format!(
        "SELECT count(*) AS count FROM {table} t WHERE strpos(row_to_json(t)::text, $1) > 0"
    ))
    .bind::<Text, _>(needle)
    .get_result::<Count>(conn)
    .await
    .expect("search rows")
    .count
}

#[tokio::test(flavor = "multi_thread")]
async fn a_token_admits_exactly_max_uses_agents_under_concurrent_registration() {
    let test_db = TestDb::new().await;
    let mut conn = test_db.conn().await;
    let org = acme(&mut conn).await;
    let (created, secret) = token(&mut conn, &org, 3, &Labels::default()).await;
    let pool = support::pool(&test_db, 10);

    let mut tasks = Vec::new();
    for i in 0..10 {
        let (pool, secret) = (pool.clone(), secret.clone());
        tasks.push(tokio::spawn(async move {
            let mut conn = support::conn_from(&pool).await;
            register(&mut conn, &secret, &format!("runner-{i}")).await
        }));
    }
    let results: Vec<_> = futures_util::future::join_all(tasks)
        .await
        .into_iter()
        .map(|r| r.expect("join"))
        .collect();

    let admitted = results.iter().filter(|r| r.is_ok()).count();
    let used_up = results
        .iter()
        .filter(|r| matches!(r, Err(RegistrationRefused::UsedUp)))
        .count();
    assert_eq!((admitted, used_up), (3, 7));
    assert_eq!(
        db::agents::list(&mut conn, &org)
            .await
            .expect("agents")
            .len(),
        3
    );
    let uses = support::count(
        &mut conn,
        "SELECT uses::int8 AS count FROM registration_tokens",
    )
    .await;
    assert_eq!(uses, 3);
    for registered in results.into_iter().flatten() {
        assert_eq!(registered.agent.registration_token_id, Some(created.id));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_expired_or_revoked_token_is_refused_as_expired() {
    let test_db = TestDb::new().await;
    let mut conn = test_db.conn().await;
    let org = acme(&mut conn).await;
    let (_, expired) = token(&mut conn, &org, 5, &Labels::default()).await;
    support::exec(
        &mut conn,
        "UPDATE registration_tokens SET expires_at = now() - interval '1 minute'",
    )
    .await;
    let (_, revoked) = token(&mut conn, &org, 5, &Labels::default()).await;
    support::exec(
        &mut conn,
        "UPDATE registration_tokens SET revoked_at = now() WHERE expires_at > now()",
    )
    .await;

    assert!(matches!(
        register(&mut conn, &expired, "a").await,
        Err(RegistrationRefused::Expired)
    ));
    assert!(matches!(
        register(&mut conn, &revoked, "b").await,
        Err(RegistrationRefused::Expired)
    ));
    assert!(
        db::agents::list(&mut conn, &org)
            .await
            .expect("agents")
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unknown_token_is_refused_as_unknown() {
    let test_db = TestDb::new().await;
    let mut conn = test_db.conn().await;
    let org = acme(&mut conn).await;
    let (_, secret) = token(&mut conn, &org, 5, &Labels::default()).await;
    let last = if secret.ends_with('0') { '1' } else { '0' };
    let forged = format!("{}{last}", &secret[..secret.len() - 1]);

    let refused = register(&mut conn, &forged, "runner").await;

    assert!(matches!(refused, Err(RegistrationRefused::Unknown)));
    assert_eq!(
        support::count(
            &mut conn,
            "SELECT sum(uses)::int8 AS count FROM registration_tokens"
        )
        .await,
        0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_invalid_profile_is_refused_without_spending_a_use() {
    let test_db = TestDb::new().await;
    let mut conn = test_db.conn().await;
    let org = acme(&mut conn).await;
    let (_, secret) = token(&mut conn, &org, 1, &Labels::default()).await;
    let mut bad = profile("runner");
    bad.capacity = 0;

    let refused = db::agents::register(&mut conn, &secret, &bad).await;

    assert!(matches!(
        refused,
        Err(DbError::Domain(DomainError::Invalid(_)))
    ));
    assert!(
        register(&mut conn, &secret, "runner").await.is_ok(),
        "the only use is still there"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn secrets_are_stored_only_as_hashes() {
    let test_db = TestDb::new().await;
    let mut conn = test_db.conn().await;
    let org = acme(&mut conn).await;
    let (_, token_secret) = token(&mut conn, &org, 1, &Labels::default()).await;
    let registered = register(&mut conn, &token_secret, "runner")
        .await
        .expect("registered");

    for table in [
        "registration_tokens",
        "agents",
        "agent_credentials",
        "audit_events",
    ] {
        for secret in [&token_secret, &registered.secret] {
            assert_eq!(
                rows_containing(&mut conn, table, secret).await,
                0,
                "{table} stores a plaintext secret"
            );
        }
    }
    #[derive(diesel::QueryableByName)]
    struct Hashed {
        #[diesel(sql_type = diesel::sql_types::Bool)]
        token: bool,
        #[diesel(sql_type = diesel::sql_types::Bool)]
        agent: bool,
    }
    let hashed: Hashed = diesel::sql_query(
        "SELECT EXISTS (SELECT 1 FROM registration_tokens WHERE token_hash = sha256(convert_to($1, 'UTF8'))) AS token, \
                EXISTS (SELECT 1 FROM agent_credentials WHERE secret_hash = sha256(convert_to($2, 'UTF8'))) AS agent",
    )
    .bind::<Text, _>(&token_secret)
    .bind::<Text, _>(&registered.secret)
    .get_result(&mut conn)
    .await
    .expect("hash lookup");
    assert!(
        hashed.token && hashed.agent,
        "the stored values are the secrets' SHA-256"
    );
    assert!(token_secret.starts_with("syr_") && registered.secret.starts_with("sya_"));
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_authenticates_with_its_secret_until_revoked() {
    let test_db = TestDb::new().await;
    let mut conn = test_db.conn().await;
    let org = acme(&mut conn).await;
    let (_, token_secret) = token(&mut conn, &org, 2, &Labels::default()).await;
    let registered = register(&mut conn, &token_secret, "runner")
        .await
        .expect("registered");
    let bystander = register(&mut conn, &token_secret, "bystander")
        .await
        .expect("registered");
    let id = registered.agent.agent_id();

    let found = db::agents::authenticate(&mut conn, &registered.secret)
        .await
        .expect("authenticate");
    let wrong = db::agents::authenticate(&mut conn, &token_secret)
        .await
        .expect("authenticate");

    assert_eq!(found.as_ref().map(|a| a.id), Some(id.as_uuid()));
    assert!(
        wrong.is_none(),
        "a registration token is not an agent secret"
    );

    let revoked = db::agents::revoke(&mut conn, &org, id)
        .await
        .expect("revoke");

    assert_eq!(revoked.status(), AgentStatus::Revoked);
    assert!(revoked.revoked_at.is_some());
    assert!(
        db::agents::authenticate(&mut conn, &registered.secret)
            .await
            .expect("authenticate")
            .is_none()
    );
    let reconnect = db::agents::set_status(&mut conn, id, AgentStatus::Online).await;
    assert!(
        matches!(reconnect, Err(DbError::NotFound)),
        "a revoked agent stays revoked"
    );
    assert!(
        db::agents::authenticate(&mut conn, &bystander.secret)
            .await
            .expect("authenticate")
            .is_some(),
        "revoking one agent leaves the others"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_tokens_labels_are_merged_into_the_agents() {
    let test_db = TestDb::new().await;
    let mut conn = test_db.conn().await;
    let org = acme(&mut conn).await;
    let (_, secret) = token(&mut conn, &org, 1, &Labels::new(["pool=ci", "os=linux"])).await;

    let registered = register(&mut conn, &secret, "runner")
        .await
        .expect("registered");

    assert_eq!(registered.agent.labels, ["os=linux", "pool=ci"]);
    assert_eq!(registered.agent.org_id, "acme");
    assert_eq!(registered.agent.capacity, 2);
    assert_eq!(registered.agent.version, "1.2.3");
    assert_eq!(registered.agent.status(), AgentStatus::Offline);
    let stored = db::agents::get(&mut conn, &org, registered.agent.agent_id())
        .await
        .expect("get");
    assert_eq!(stored, registered.agent);
}

#[tokio::test(flavor = "multi_thread")]
async fn another_orgs_agent_is_not_found() {
    let test_db = TestDb::new().await;
    let mut conn = test_db.conn().await;
    let org = acme(&mut conn).await;
    let globex = support::org(&mut conn, "globex").await;
    let (_, secret) = token(&mut conn, &org, 1, &Labels::default()).await;
    let registered = register(&mut conn, &secret, "runner")
        .await
        .expect("registered");
    let id = registered.agent.agent_id();

    let got = db::agents::get(&mut conn, &globex, id).await;
    let revoked = db::agents::revoke(&mut conn, &globex, id).await;

    assert!(matches!(got, Err(DbError::NotFound)), "got {got:?}");
    assert!(matches!(revoked, Err(DbError::NotFound)), "got {revoked:?}");
    assert!(
        db::agents::list(&mut conn, &globex)
            .await
            .expect("list")
            .is_empty()
    );
    assert!(
        db::agents::authenticate(&mut conn, &registered.secret)
            .await
            .expect("auth")
            .is_some()
    );
    assert!(matches!(
        db::agents::get(&mut conn, &org, AgentId::new()).await,
        Err(DbError::NotFound)
    ));
}

#[tokio::test(flavor = "multi_thread")]
async fn set_status_records_when_the_agent_was_last_seen() {
    let test_db = TestDb::new().await;
    let mut conn = test_db.conn().await;
    let org = acme(&mut conn).await;
    let (_, secret) = token(&mut conn, &org, 1, &Labels::default()).await;
    let registered = register(&mut conn, &secret, "runner")
        .await
        .expect("registered");

    let online =
        db::agents::set_status(&mut conn, registered.agent.agent_id(), AgentStatus::Online)
            .await
            .expect("online");

    assert_eq!(online.status(), AgentStatus::Online);
    assert!(online.last_seen_at.is_some());
    assert!(matches!(
        db::agents::set_status(&mut conn, AgentId::new(), AgentStatus::Online).await,
        Err(DbError::NotFound)
    ));
}
