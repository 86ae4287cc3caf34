//! Builders and queries shared by the tests: an org, a valid job, a job
//! leased and started, and direct reads of rows the API does not expose.

use std::time::Duration;

use chrono::{DateTime, Utc};
use db::jobs::{CreateContext, Job};
use db::leases::Lease;
use db::schema::attempts;
use db::{PgConn, PooledConn};
use diesel::prelude::*;
use diesel::sql_types::BigInt;
use diesel_async::RunQueryDsl;
use domain::job::{ConcurrencyKey, Labels, NewJob, Payload, QueueName, Timeouts};
use domain::org::OrgSettings;
use domain::retry::RetryPolicy;
use domain::{AgentId, JobId, OrgId};
use test_support::TestDb;
use uuid::Uuid;

/// How long an agent has to acknowledge a lease in these tests.
pub const ACK: Duration = Duration::from_secs(30);
/// Lease length once running.
pub const TTL: Duration = Duration::from_secs(60);

pub fn org_id(name: &str) -> OrgId {
    OrgId::parse(name).expect("valid org id")
}

/// Creates (ensures) the org `acme` and returns its id.
pub async fn acme(conn: &mut PgConn) -> OrgId {
    org(conn, "acme").await
}

pub async fn org(conn: &mut PgConn, name: &str) -> OrgId {
    let org = org_id(name);
    db::orgs::ensure_org(conn, &org, Some(name))
        .await
        .expect("ensure org");
    org
}

/// A valid job running `command` in the backlog queue.
pub fn job(command: &str) -> NewJob {
    NewJob {
        queue: QueueName::backlog(),
        priority: 0,
        repository_id: None,
        required_labels: Labels::default(),
        concurrency: None,
        requires_approval: false,
        retry_policy: RetryPolicy::default(),
        timeouts: Timeouts::default(),
        run_at: None,
        payload: Payload {
            prompt: None,
            command: Some(command.to_owned()),
        },
        metadata: serde_json::json!({}),
    }
}

/// A retry policy without backoff, so a failed job can be leased again at once.
pub fn no_backoff(maximum_attempts: u32) -> RetryPolicy {
    RetryPolicy {
        initial_interval_ms: 0,
        maximum_interval_ms: 0,
        maximum_attempts,
        ..RetryPolicy::default()
    }
}

pub fn with_key(mut new: NewJob, key: &str, limit: u32) -> NewJob {
    new.concurrency = Some(ConcurrencyKey {
        key: key.to_owned(),
        limit,
    });
    new
}

/// Creates `jobs` under the default settings.
pub async fn create(conn: &mut PgConn, org: &OrgId, jobs: &[NewJob]) -> Vec<Job> {
    create_with(conn, org, &OrgSettings::default(), jobs).await
}

pub async fn create_with(
    conn: &mut PgConn,
    org: &OrgId,
    settings: &OrgSettings,
    jobs: &[NewJob],
) -> Vec<Job> {
    let ctx = context(org, settings);
    let created = db::jobs::create_jobs(conn, &ctx, jobs, None)
        .await
        .expect("create jobs");
    assert!(!created.replayed);
    created.jobs
}

pub async fn create_one(conn: &mut PgConn, org: &OrgId, new: NewJob) -> Job {
    create(conn, org, &[new])
        .await
        .pop()
        .expect("one job created")
}

pub fn context<'a>(org: &'a OrgId, settings: &'a OrgSettings) -> CreateContext<'a> {
    CreateContext {
        org,
        settings,
        settings_version: db::orgs::SettingsVersion::Current,
        created_by: Some("tester"),
        request_id: Some("req-1"),
        trace: None,
        lease_on_create: None,
    }
}

/// Leases `job` to `agent` and acknowledges the lease (the job is running).
pub async fn lease_and_start(conn: &mut PgConn, job: JobId, agent: AgentId) -> Lease {
    let lease = db::leases::lease_job(conn, job, agent, ACK)
        .await
        .expect("lease");
    db::leases::start(conn, job, lease.epoch as u64, TTL)
        .await
        .expect("start");
    lease
}

pub async fn reload(conn: &mut PgConn, job: JobId) -> Job {
    db::jobs::get_any(conn, job).await.expect("job exists")
}

/// A row of `attempts`.
#[derive(Debug, Queryable, Selectable)]
#[diesel(table_name = attempts)]
pub struct Attempt {
    pub job_id: Uuid,
    pub epoch: i64,
    pub attempt: i32,
    pub agent_id: Uuid,
    pub leased_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub ended_at: DateTime<Utc>,
    pub outcome: String,
    pub exit_code: Option<i32>,
    pub error_kind: Option<String>,
    pub error_message: Option<String>,
}

/// The job's attempt history, oldest first.
pub async fn attempts_of(conn: &mut PgConn, job: JobId) -> Vec<Attempt> {
    attempts::table
        .filter(attempts::job_id.eq(job.as_uuid()))
        .order(attempts::epoch.asc())
        .select(Attempt::as_select())
        .load(conn)
        .await
        .expect("load attempts")
}

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    count: i64,
}

/// Runs a `SELECT count(*) AS count …` statement without parameters.
pub async fn count(conn: &mut PgConn, sql: &str) -> i64 {
    diesel::sql_query(sql)
        .get_result::<Count>(conn)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .count
}

/// Runs a statement without parameters; returns the rows it affected.
pub async fn exec(conn: &mut PgConn, sql: &str) -> usize {
    diesel::sql_query(sql)
        .execute(conn)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

/// A pool of its own on the test's database, for tasks that race each
/// other on separate connections.
pub fn pool(test_db: &TestDb, max_size: usize) -> db::Db {
    let mut config = db::PoolConfig::new(test_db.url());
    config.transaction_pooling = test_db.transaction_pooling();
    config.max_size = max_size;
    config.acquire_timeout = Duration::from_secs(20);
    db::Db::connect(&config).expect("pool")
}

pub async fn conn_from(db: &db::Db) -> PooledConn {
    db.conn().await.expect("pooled connection")
}

/// Asserts `at` lies within `[low, high]`, with some slack for clock
/// resolution between Rust and PostgreSQL.
#[track_caller]
pub fn assert_between(at: DateTime<Utc>, low: DateTime<Utc>, high: DateTime<Utc>) {
    let slack = chrono::Duration::milliseconds(50);
    assert!(
        at >= low - slack && at <= high + slack,
        "{at} is not within [{low}, {high}]"
    );
}

pub fn secs(n: i64) -> chrono::Duration {
    chrono::Duration::seconds(n)
}
