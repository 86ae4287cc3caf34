//! Simulated agents and helpers for driving the scheduler.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bus::{Bus, Channel};
use db::agents::NewRegistrationToken;
use db::jobs::{CreateContext, Created};
use diesel_async::RunQueryDsl;
use domain::agent::AgentProfile;
use domain::events::{Envelope, Event};
use domain::job::{JobStatus, Labels, NewJob, Payload, QueueName, Timeouts};
use domain::org::OrgSettings;
use domain::retry::RetryPolicy;
use domain::{AgentId, JobId, OrgId, RepositoryId};
use futures_util::StreamExt;
use test_support::{TestDb, TestRedis};
use tokio::sync::Mutex;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub fn org(name: &str) -> OrgId {
    OrgId::parse(name).expect("org id")
}

pub fn bus(redis: &TestRedis) -> Bus {
    Bus::connect(&test_support::bus_config(redis.url(), redis.prefix())).expect("bus")
}

pub fn fast_settings() -> scheduler::Settings {
    scheduler::Settings {
        sweep_interval: Duration::from_millis(200),
        ack_timeout: Duration::from_secs(5),
        cancel_grace: Duration::from_secs(2),
        aging: Some(Duration::from_secs(60)),
        max_leases_per_tick: 1_000,
        queue_depth_interval: Duration::ZERO,
    }
}

/// Starts an engine in-process; cancel the token to stop it.
pub fn start_engine(
    db: &TestDb,
    bus: &Bus,
    settings: scheduler::Settings,
) -> (CancellationToken, JoinHandle<()>) {
    let engine = scheduler::Engine::new(
        db.db().clone(),
        bus.clone(),
        settings,
        &prometheus::Registry::new(),
    );
    let stop = CancellationToken::new();
    let task = tokio::spawn(engine.run(stop.clone()));
    (stop, task)
}

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
            command: Some(command.into()),
        },
        metadata: serde_json::json!({}),
    }
}

pub async fn create_jobs(db: &TestDb, org: &OrgId, jobs: &[NewJob]) -> Vec<JobId> {
    let mut conn = db.conn().await;
    db::orgs::ensure_org(&mut conn, org, None)
        .await
        .expect("org");
    let settings = OrgSettings::default();
    let ctx = CreateContext {
        org,
        settings: &settings,
        settings_version: db::orgs::SettingsVersion::Current,
        created_by: Some("test"),
        request_id: None,
        trace: None,
        lease_on_create: None,
    };
    let mut ids = Vec::new();
    for chunk in jobs.chunks(1_000) {
        let Created { jobs, .. } = db::jobs::create_jobs(&mut conn, &ctx, chunk, None)
            .await
            .expect("create");
        ids.extend(jobs.iter().map(|j| j.job_id()));
    }
    ids
}

pub async fn create_repository(db: &TestDb, org: &OrgId, name: &str) -> RepositoryId {
    let mut conn = db.conn().await;
    db::orgs::ensure_org(&mut conn, org, None)
        .await
        .expect("org");
    let repo = db::repositories::create(
        &mut conn,
        org,
        &domain::org::RepositorySpec {
            name: name.into(),
            url: None,
            max_concurrent_jobs: None,
        },
    )
    .await
    .expect("repository");
    RepositoryId(repo.id)
}

pub async fn wake(bus: &Bus, org: &OrgId) {
    let event = Envelope::new(
        org.clone(),
        Event::QueueChanged {
            queue: QueueName::backlog(),
        },
    );
    bus.publish(&Channel::SchedulerWake, &event)
        .await
        .expect("wake");
}

/// How a simulated agent answers an assignment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Behaviour {
    /// Acknowledge, work for the given time, succeed.
    Succeed(Duration),
    /// Acknowledge, then fail with exit code 1.
    Fail,
    /// Acknowledge, then go silent (no heartbeat, no result).
    GoSilent,
}

/// Everything simulated agents observed, in order.
#[derive(Default)]
pub struct Journal {
    /// (job, epoch, agent) in the order assignments were acknowledged.
    pub started: Vec<(JobId, u64, AgentId)>,
    pub finished: Vec<(JobId, u64)>,
}

pub struct SimAgent {
    pub id: AgentId,
    pub stop: CancellationToken,
}

/// Registers `count` agents of `capacity`, subscribes each to its channel,
/// then marks them online. Each runs `behaviour` on every assignment.
#[expect(clippy::too_many_arguments, reason = "a test harness constructor")]
pub async fn spawn_agents(
    db: &TestDb,
    bus: &Bus,
    org: &OrgId,
    count: usize,
    capacity: u32,
    labels: &[&str],
    lease_ttl: Duration,
    behaviour: Behaviour,
    journal: Arc<Mutex<Journal>>,
) -> Vec<SimAgent> {
    let mut conn = db.conn().await;
    db::orgs::ensure_org(&mut conn, org, None)
        .await
        .expect("org");
    let (_, token) = db::agents::create_registration_token(
        &mut conn,
        NewRegistrationToken {
            org,
            description: None,
            labels: &Labels::default(),
            max_uses: count as u32,
            ttl: Duration::from_secs(3_600),
            created_by: "test",
        },
    )
    .await
    .expect("token");
    let mut agents = Vec::new();
    for i in 0..count {
        let registered = db::agents::register(
            &mut conn,
            &token,
            &AgentProfile {
                name: format!("sim-{i}"),
                labels: Labels::new(labels.iter().copied()),
                capacity,
                version: "test".into(),
            },
        )
        .await
        .expect("db")
        .expect("registered");
        let id = registered.agent.agent_id();
        let events = bus
            .subscribe(&[Channel::Agent(id)])
            .await
            .expect("subscribe");
        let stop = CancellationToken::new();
        tokio::spawn(run_agent(
            db.db().clone(),
            bus.clone(),
            org.clone(),
            id,
            events,
            lease_ttl,
            behaviour,
            journal.clone(),
            stop.clone(),
        ));
        agents.push(SimAgent { id, stop });
    }
    diesel::sql_query("UPDATE agents SET status = 'online' WHERE org_id = $1")
        .bind::<diesel::sql_types::Text, _>(org.as_str())
        .execute(&mut conn)
        .await
        .expect("online");
    agents
}

#[expect(clippy::too_many_arguments, reason = "the agent's whole context")]
async fn run_agent(
    db: db::Db,
    bus: Bus,
    org: OrgId,
    id: AgentId,
    mut events: impl futures_util::Stream<Item = Envelope> + Unpin,
    lease_ttl: Duration,
    behaviour: Behaviour,
    journal: Arc<Mutex<Journal>>,
    stop: CancellationToken,
) {
    loop {
        let event = tokio::select! {
            _ = stop.cancelled() => return,
            event = events.next() => match event { Some(e) => e, None => return },
        };
        let (agent_id, offers) = match event.event {
            Event::AssignmentOffered {
                job_id,
                epoch,
                agent_id,
                ..
            } => (agent_id, vec![(job_id, epoch)]),
            Event::AssignmentsOffered { agent_id, offers } => (
                agent_id,
                offers.iter().map(|o| (o.job_id, o.epoch)).collect(),
            ),
            _ => continue,
        };
        assert_eq!(agent_id, id, "offer delivered to the wrong agent");
        for (job_id, epoch) in offers {
            run_job(
                &db, &bus, &org, id, job_id, epoch, lease_ttl, behaviour, &journal,
            );
        }
    }
}

/// Runs one offered job as `behaviour` says, in its own task.
#[expect(clippy::too_many_arguments, reason = "the agent's whole context")]
fn run_job(
    db: &db::Db,
    bus: &Bus,
    org: &OrgId,
    id: AgentId,
    job_id: JobId,
    epoch: u64,
    lease_ttl: Duration,
    behaviour: Behaviour,
    journal: &Arc<Mutex<Journal>>,
) {
    let db = db.clone();
    let bus = bus.clone();
    let org = org.clone();
    let journal = journal.clone();
    tokio::spawn(async move {
        let mut conn = db.conn().await.expect("conn");
        if db::leases::start(&mut conn, job_id, epoch, lease_ttl)
            .await
            .is_err()
        {
            return;
        }
        journal.lock().await.started.push((job_id, epoch, id));
        match behaviour {
            Behaviour::Succeed(work) => {
                tokio::time::sleep(work).await;
                if db::leases::succeed(&mut conn, job_id, epoch, Some(0))
                    .await
                    .is_ok()
                {
                    journal.lock().await.finished.push((job_id, epoch));
                }
            }
            Behaviour::Fail => {
                let ending = db::leases::Ending::Failed {
                    exit_code: Some(1),
                    error_kind: None,
                    message: Some("simulated failure".into()),
                };
                let _ = db::leases::end_attempt(&mut conn, job_id, Some(epoch), ending).await;
            }
            Behaviour::GoSilent => return,
        }
        wake(&bus, &org).await;
    });
}

/// Polls until every job in `ids` is in a terminal status, or panics.
pub async fn wait_until_finished(
    db: &TestDb,
    ids: &[JobId],
    timeout: Duration,
) -> HashMap<JobId, JobStatus> {
    let deadline = tokio::time::Instant::now() + timeout;
    let uuids: Vec<uuid::Uuid> = ids.iter().map(|j| j.as_uuid()).collect();
    loop {
        let mut conn = db.conn().await;
        let rows: Vec<StatusRow> =
            diesel::sql_query("SELECT id, status FROM jobs WHERE id = ANY($1)")
                .bind::<diesel::sql_types::Array<diesel::sql_types::Uuid>, _>(&uuids)
                .load(&mut conn)
                .await
                .expect("statuses");
        let statuses: HashMap<JobId, JobStatus> = rows
            .into_iter()
            .map(|r| (JobId(r.id), r.status.parse().expect("status")))
            .collect();
        if statuses.values().all(|s| s.is_terminal()) && statuses.len() == ids.len() {
            return statuses;
        }
        if tokio::time::Instant::now() > deadline {
            let open = statuses.values().filter(|s| !s.is_terminal()).count();
            panic!("{open} of {} jobs still open after {timeout:?}", ids.len());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[derive(diesel::QueryableByName)]
struct StatusRow {
    #[diesel(sql_type = diesel::sql_types::Uuid)]
    id: uuid::Uuid,
    #[diesel(sql_type = diesel::sql_types::Text)]
    status: String,
}

#[derive(diesel::QueryableByName)]
pub struct Count {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    pub n: i64,
}

pub async fn count(db: &TestDb, sql: &str) -> i64 {
    let mut conn = db.conn().await;
    let row: Count = diesel::sql_query(sql)
        .get_result(&mut conn)
        .await
        .expect("count");
    row.n
}
