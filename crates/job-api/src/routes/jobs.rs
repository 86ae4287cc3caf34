//! Jobs: create (with idempotency), batch create, list, show, logs, and the
//! operator actions cancel, retry, approve and reject.

use actix_web::{HttpRequest, HttpResponse, web};
use bus::Channel;
use chrono::Utc;
use db::DbError;
use db::jobs::{CreateContext, Idempotency, ListFilter};
use db::leases::OperatorAction;
use db::orgs::SettingsVersion;
use domain::events::Event;
use domain::job::JobStatus;
use domain::org::OrgSettings;
use domain::scheduling::{BlockReason, order, plan};
use domain::validation::limits;
use domain::{AgentId, JobId, OrgId, RepositoryId};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use utoipa::IntoParams;
use uuid::Uuid;

use crate::caller::{ApproveJobs, Authorized, OrgCaller};
use crate::creates::{self, Made, Pending, Written};
use crate::error::{ApiError, ApiResult};
use crate::state::AppState;
use crate::views::{
    AttemptView, CreateJob, CreateJobs, JobDetail, JobList, JobPage, JobView, LogLineView, LogPage,
};

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/orgs/{org_id}/jobs", web::post().to(create_job))
        .route("/orgs/{org_id}/jobs", web::get().to(list_jobs))
        .route(
            "/orgs/{org_id}/jobs/batch",
            web::post().to(create_jobs_batch),
        )
        .route("/orgs/{org_id}/jobs/{job_id}", web::get().to(get_job))
        .route(
            "/orgs/{org_id}/jobs/{job_id}/logs",
            web::get().to(get_job_logs),
        )
        .route(
            "/orgs/{org_id}/jobs/{job_id}/cancel",
            web::post().to(cancel_job),
        )
        .route(
            "/orgs/{org_id}/jobs/{job_id}/retry",
            web::post().to(retry_job),
        )
        .route(
            "/orgs/{org_id}/jobs/{job_id}/approve",
            web::post().to(approve_job),
        )
        .route(
            "/orgs/{org_id}/jobs/{job_id}/reject",
            web::post().to(reject_job),
        );
}

/// Path of a job route.
#[derive(Deserialize, IntoParams)]
pub struct JobPath {
    /// Organization id (from the identity provider).
    pub org_id: String,
    pub job_id: String,
}

impl JobPath {
    /// A malformed id cannot name a job: 404, like any other unknown job.
    fn job(&self) -> ApiResult<JobId> {
        self.job_id.parse().map_err(|_| ApiError::NotFound("job"))
    }
}

const IDEMPOTENCY_HEADER: &str = "idempotency-key";

fn idempotency<'a>(
    req: &'a HttpRequest,
    body: &impl serde::Serialize,
) -> ApiResult<Option<Idempotency<'a>>> {
    let Some(value) = req.headers().get(IDEMPOTENCY_HEADER) else {
        return Ok(None);
    };
    let key = value
        .to_str()
        .ok()
        .filter(|k| !k.is_empty() && k.len() <= 255)
        .ok_or_else(|| {
            ApiError::invalid(
                "Idempotency-Key",
                "must be 1 to 255 visible ASCII characters",
            )
        })?;
    // serde_json orders object keys, so equal bodies hash equally.
    let canonical = serde_json::to_vec(body).map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok(Some(Idempotency {
        key,
        request_hash: Sha256::digest(&canonical).to_vec(),
    }))
}

async fn create(
    state: &AppState,
    caller: &OrgCaller,
    requests: Vec<CreateJob>,
    idem: Option<Idempotency<'_>>,
    batch: bool,
) -> ApiResult<(Vec<db::jobs::Job>, bool)> {
    let lease_on_create = state.lease_on_create(&caller.org);
    // A busy org's single-job create is written with the others made
    // meanwhile (see `crate::creates`). An idle org's is written here: to be
    // leased by its create, without the hop to a writer (0.2 ms of the idle
    // created -> assigned p50).
    if idem.is_none()
        && !batch
        && lease_on_create.is_none()
        && let Some(cached) = state.cached_settings(&caller.org)
    {
        let jobs = new_jobs(requests.clone(), &cached.settings, batch)?;
        let pending = Pending {
            org: caller.org.clone(),
            settings: cached,
            created_by: caller.actor(),
            request_id: caller.request_id().map(str::to_owned),
            trace: telemetry::current_trace_context(),
            jobs,
        };
        match state.creates.create(pending).await {
            Written::Created(jobs) => return Ok((jobs, false)),
            Written::Failed(error) => return Err(error),
            Written::Alone => {}
        }
    }
    let mut conn = state.db.conn().await?;
    // An idempotent create reads the settings. Otherwise they come from the
    // cache, saving a round trip on every create; the insert checks them in
    // its own pipeline, and when they changed it is made again with them
    // read afresh.
    if idem.is_none()
        && let Some(cached) = state.cached_settings(&caller.org)
    {
        let version = SettingsVersion::Cached(cached.updated_at);
        if let Some(done) = create_with(
            state,
            &mut conn,
            caller,
            requests.clone(),
            None,
            batch,
            &cached.settings,
            version,
            lease_on_create,
        )
        .await?
        {
            return Ok(done);
        }
    }
    let settings = state.read_settings(&mut conn, &caller.org).await?.settings;
    create_with(
        state,
        &mut conn,
        caller,
        requests,
        idem,
        batch,
        &settings,
        SettingsVersion::Current,
        lease_on_create,
    )
    .await?
    .ok_or_else(|| ApiError::Internal("settings read for this create were stale".to_owned()))
}

#[allow(clippy::too_many_arguments)]
async fn create_with(
    state: &AppState,
    conn: &mut db::PgConn,
    caller: &OrgCaller,
    requests: Vec<CreateJob>,
    idem: Option<Idempotency<'_>>,
    batch: bool,
    settings: &OrgSettings,
    settings_version: SettingsVersion,
    lease_on_create: Option<std::time::Duration>,
) -> ApiResult<Option<(Vec<db::jobs::Job>, bool)>> {
    let jobs = new_jobs(requests, settings, batch)?;
    let actor = caller.actor();
    let trace = telemetry::current_trace_context();
    let ctx = CreateContext {
        org: &caller.org,
        settings,
        settings_version,
        created_by: Some(&actor),
        request_id: caller.request_id(),
        trace: trace.as_ref(),
        lease_on_create,
    };
    // Checks the repositories and records the audit event in the same
    // transaction as the jobs.
    let created = match db::jobs::create_jobs(conn, &ctx, &jobs, idem).await {
        Err(DbError::StaleSettings) => return Ok(None),
        created => created?,
    };
    if !created.replayed {
        let made = Made {
            created: &created,
            request_id: caller.request_id(),
            trace: trace.as_ref(),
        };
        creates::announce(&state.bus, &state.leases_on_create, &caller.org, &[made]).await;
    }
    Ok(Some((created.jobs, created.replayed)))
}

/// The jobs `requests` ask for under `settings`, or every field refused.
fn new_jobs(
    requests: Vec<CreateJob>,
    settings: &OrgSettings,
    batch: bool,
) -> ApiResult<Vec<domain::job::NewJob>> {
    let mut jobs = Vec::with_capacity(requests.len());
    let mut errors = Vec::new();
    for (i, request) in requests.into_iter().enumerate() {
        let prefix = if batch {
            format!("jobs[{i}].")
        } else {
            String::new()
        };
        match request.into_new_job(settings, &prefix) {
            Ok(job) => jobs.push(job),
            Err(domain::DomainError::Invalid(list)) => errors.extend(list),
            Err(other) => return Err(other.into()),
        }
    }
    if !errors.is_empty() {
        return Err(ApiError::Invalid(errors));
    }
    Ok(jobs)
}

/// Create a job.
///
/// With an `Idempotency-Key` header, repeating the same request returns the
/// same job (200, `Idempotent-Replayed: true`); the same key with a
/// different body is rejected (422).
#[utoipa::path(post, path = "/v1/orgs/{org_id}/jobs", tag = "jobs",
    params(("org_id" = String, Path), ("Idempotency-Key" = Option<String>, Header, description = "makes retries safe")),
    request_body = CreateJob,
    responses((status = 201, body = JobView), (status = 200, body = JobView, description = "replayed"),
        (status = 401, body = crate::views::ProblemDoc, content_type = "application/problem+json"), (status = 404, body = crate::views::ProblemDoc, content_type = "application/problem+json"), (status = 422, body = crate::views::ProblemDoc, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub async fn create_job(
    state: web::Data<AppState>,
    caller: OrgCaller,
    req: HttpRequest,
    body: web::Json<CreateJob>,
) -> ApiResult<HttpResponse> {
    let body = body.into_inner();
    let idem = idempotency(&req, &body)?;
    let (jobs, replayed) = create(&state, &caller, vec![body], idem, false).await?;
    let job = jobs
        .first()
        .ok_or_else(|| ApiError::Internal("no job created".into()))?;
    let mut response = if replayed {
        HttpResponse::Ok()
    } else {
        HttpResponse::Created()
    };
    if replayed {
        response.insert_header(("Idempotent-Replayed", "true"));
    }
    Ok(response.json(JobView::from(job)))
}

/// Create up to 1,000 jobs in one transaction: all or nothing.
#[utoipa::path(post, path = "/v1/orgs/{org_id}/jobs/batch", tag = "jobs",
    params(("org_id" = String, Path), ("Idempotency-Key" = Option<String>, Header)),
    request_body = CreateJobs,
    responses((status = 201, body = JobList), (status = 422, body = crate::views::ProblemDoc, content_type = "application/problem+json"), (status = 401, body = crate::views::ProblemDoc, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub async fn create_jobs_batch(
    state: web::Data<AppState>,
    caller: OrgCaller,
    req: HttpRequest,
    body: web::Json<CreateJobs>,
) -> ApiResult<HttpResponse> {
    let body = body.into_inner();
    if body.jobs.is_empty() || body.jobs.len() > limits::BATCH_MAX_JOBS {
        return Err(ApiError::invalid(
            "jobs",
            format!("must hold 1 to {} jobs", limits::BATCH_MAX_JOBS),
        ));
    }
    let idem = idempotency(&req, &body)?;
    let (jobs, replayed) = create(&state, &caller, body.jobs, idem, true).await?;
    let list = JobList {
        jobs: jobs.iter().map(JobView::from).collect(),
    };
    Ok(if replayed {
        HttpResponse::Ok()
            .insert_header(("Idempotent-Replayed", "true"))
            .json(list)
    } else {
        HttpResponse::Created().json(list)
    })
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    pub status: Option<String>,
    pub queue: Option<String>,
    pub repository_id: Option<Uuid>,
    /// Jobs requiring this label.
    pub label: Option<String>,
    /// `next_cursor` from the previous page.
    pub cursor: Option<Uuid>,
    /// 1..=500, default 50.
    pub limit: Option<u32>,
}

/// List jobs, newest first, with a cursor that stays stable while jobs are added.
#[utoipa::path(get, path = "/v1/orgs/{org_id}/jobs", tag = "jobs",
    params(("org_id" = String, Path), ListQuery),
    responses((status = 200, body = JobPage), (status = 422, body = crate::views::ProblemDoc, content_type = "application/problem+json"), (status = 401, body = crate::views::ProblemDoc, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub async fn list_jobs(
    state: web::Data<AppState>,
    caller: OrgCaller,
    query: web::Query<ListQuery>,
) -> ApiResult<HttpResponse> {
    let query = query.into_inner();
    let limit = query.limit.unwrap_or(limits::PAGE_SIZE_DEFAULT);
    if limit == 0 || limit > limits::PAGE_SIZE_MAX {
        return Err(ApiError::invalid(
            "limit",
            format!("must be 1 to {}", limits::PAGE_SIZE_MAX),
        ));
    }
    let status = match query.status {
        Some(raw) => Some(
            raw.parse::<JobStatus>()
                .map_err(|e| ApiError::invalid("status", e.message))?,
        ),
        None => None,
    };
    let filter = ListFilter {
        status,
        queue: query.queue,
        repository_id: query.repository_id.map(RepositoryId),
        label: query.label,
        before: query.cursor.map(JobId),
        limit: limit + 1,
    };
    let mut conn = state.db.conn().await?;
    let mut jobs = db::jobs::list(&mut conn, &caller.org, &filter).await?;
    let next_cursor = if jobs.len() > limit as usize {
        jobs.truncate(limit as usize);
        jobs.last().map(|j| j.id)
    } else {
        None
    };
    Ok(HttpResponse::Ok().json(JobPage {
        items: jobs.iter().map(JobView::from).collect(),
        next_cursor,
    }))
}

/// Where a queued job stands, computed with the dispatcher's own ordering
/// and placement (one function, not two).
async fn queue_standing(
    conn: &mut db::PgConn,
    org: &OrgId,
    job: &db::jobs::Job,
) -> ApiResult<(Option<u64>, Option<BlockReason>)> {
    match job.status() {
        JobStatus::PendingApproval => return Ok((None, Some(BlockReason::AwaitingApproval))),
        JobStatus::Queued => {}
        _ => return Ok((None, None)),
    }
    if job.run_at > Utc::now() {
        return Ok((None, Some(BlockReason::NotBefore { run_at: job.run_at })));
    }
    let mut ready = db::dispatch::queued_candidates(conn, org, 100_000).await?;
    order(
        &mut ready,
        Utc::now(),
        Some(std::time::Duration::from_secs(60)),
    );
    let position = ready
        .iter()
        .position(|c| c.job_id == job.job_id())
        .map(|i| i as u64 + 1);
    let agents = db::dispatch::agent_offers(conn, org).await?;
    let (limits, _) = db::dispatch::limits(conn, org).await?;
    let free: usize = agents.iter().map(|a| a.free as usize).sum();
    let placement = plan(&ready, &agents, &limits, free);
    let reason = match placement.blocked.get(&job.job_id()) {
        Some(reason) => Some(reason.clone()),
        // Placeable now: it is about to be leased.
        None if placement
            .assignments
            .iter()
            .any(|(j, _)| *j == job.job_id()) =>
        {
            None
        }
        None => Some(BlockReason::WaitingForTurn),
    };
    Ok((position, reason))
}

/// Show a job: status, attempts, lease, queue position and blocking reason, last log lines.
#[utoipa::path(get, path = "/v1/orgs/{org_id}/jobs/{job_id}", tag = "jobs",
    params(JobPath),
    responses((status = 200, body = JobDetail), (status = 404, body = crate::views::ProblemDoc, content_type = "application/problem+json"), (status = 401, body = crate::views::ProblemDoc, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub async fn get_job(
    state: web::Data<AppState>,
    caller: OrgCaller,
    path: web::Path<JobPath>,
) -> ApiResult<HttpResponse> {
    let id = path.job()?;
    let mut conn = state.db.conn().await?;
    let job = db::jobs::get(&mut conn, &caller.org, id)
        .await
        .map_err(not_found("job"))?;
    let attempts = db::jobs::attempts(&mut conn, id).await?;
    let (queue_position, blocked_reason) = queue_standing(&mut conn, &caller.org, &job).await?;
    let log_tail = db::logs::tail(&mut conn, id, 20).await?;
    Ok(HttpResponse::Ok().json(JobDetail {
        job: JobView::from(&job),
        attempts: attempts
            .into_iter()
            .map(|a| AttemptView {
                epoch: a.epoch,
                attempt: a.attempt,
                agent_id: a.agent_id,
                leased_at: a.leased_at,
                started_at: a.started_at,
                ended_at: a.ended_at,
                outcome: a.outcome,
                exit_code: a.exit_code,
                error_kind: a.error_kind,
                error_message: a.error_message,
            })
            .collect(),
        queue_position,
        blocked_reason,
        log_tail: log_tail.into_iter().map(LogLineView::from).collect(),
    }))
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct LogQuery {
    /// Return lines with a greater sequence number (default 0: from the start).
    pub after_seq: Option<i64>,
    /// 1..=5000, default 500.
    pub limit: Option<u32>,
}

/// Read a job's log, in pages by sequence number.
#[utoipa::path(get, path = "/v1/orgs/{org_id}/jobs/{job_id}/logs", tag = "jobs",
    params(JobPath, LogQuery),
    responses((status = 200, body = LogPage), (status = 404, body = crate::views::ProblemDoc, content_type = "application/problem+json"), (status = 422, body = crate::views::ProblemDoc, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub async fn get_job_logs(
    state: web::Data<AppState>,
    caller: OrgCaller,
    path: web::Path<JobPath>,
    query: web::Query<LogQuery>,
) -> ApiResult<HttpResponse> {
    let id = path.job()?;
    let after = query.after_seq.unwrap_or(0);
    let limit = query.limit.unwrap_or(500);
    if after < 0 {
        return Err(ApiError::invalid("after_seq", "must not be negative"));
    }
    if limit == 0 || limit > 5_000 {
        return Err(ApiError::invalid("limit", "must be 1 to 5000"));
    }
    let mut conn = state.db.conn().await?;
    db::jobs::get(&mut conn, &caller.org, id)
        .await
        .map_err(not_found("job"))?;
    let lines = db::logs::read(&mut conn, id, after, limit).await?;
    let next_after_seq = lines.last().map_or(after, |l| l.seq);
    Ok(HttpResponse::Ok().json(LogPage {
        lines: lines.into_iter().map(LogLineView::from).collect(),
        next_after_seq,
    }))
}

fn not_found(what: &'static str) -> impl Fn(db::DbError) -> ApiError {
    move |error| match error {
        db::DbError::NotFound => ApiError::NotFound(what),
        other => other.into(),
    }
}

pub(crate) async fn act(
    state: &AppState,
    caller: &OrgCaller,
    id: JobId,
    action: OperatorAction,
) -> ApiResult<HttpResponse> {
    let mut conn = state.db.conn().await?;
    let job = db::leases::operate_audited(
        &mut conn,
        &caller.org,
        id,
        action,
        &caller.actor(),
        caller.request_id(),
    )
    .await
    .map_err(not_found("job"))?;
    let lifecycle = job.lifecycle();
    state
        .publish(
            Channel::Job(id),
            &caller.org,
            Event::JobStatusChanged {
                job_id: id,
                status: lifecycle.status,
                attempt: lifecycle.attempt(),
                epoch: lifecycle.epoch,
                agent_id: job.agent_id.map(AgentId),
            },
            caller.request_id(),
        )
        .await;
    match (lifecycle.status, job.agent_id) {
        (JobStatus::CancelRequested, Some(agent)) => {
            let event = Event::CancelRequested {
                agent_id: AgentId(agent),
                job_id: id,
                epoch: lifecycle.epoch,
                grace_ms: state.cancel_grace.as_millis() as u64,
            };
            state
                .publish(
                    Channel::Agent(AgentId(agent)),
                    &caller.org,
                    event,
                    caller.request_id(),
                )
                .await;
        }
        (JobStatus::Queued, _) => {
            let queue = job.queue_name();
            state
                .publish(
                    Channel::SchedulerWake,
                    &caller.org,
                    Event::QueueChanged { queue },
                    caller.request_id(),
                )
                .await;
        }
        _ => {}
    }
    Ok(HttpResponse::Ok().json(JobView::from(&job)))
}

/// Cancel a job. Queued jobs end at once; running ones are asked to stop
/// and are force-cancelled after the grace period.
#[utoipa::path(post, path = "/v1/orgs/{org_id}/jobs/{job_id}/cancel", tag = "jobs", params(JobPath),
    responses((status = 200, body = JobView), (status = 404, body = crate::views::ProblemDoc, content_type = "application/problem+json"), (status = 409, body = crate::views::ProblemDoc, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub async fn cancel_job(
    state: web::Data<AppState>,
    caller: OrgCaller,
    path: web::Path<JobPath>,
) -> ApiResult<HttpResponse> {
    act(
        &state,
        &caller,
        path.job()?,
        OperatorAction::Cancel {
            grace: state.cancel_grace,
        },
    )
    .await
}

/// Run a finished (failed, cancelled, timed out or dead) job again with a fresh retry budget.
#[utoipa::path(post, path = "/v1/orgs/{org_id}/jobs/{job_id}/retry", tag = "jobs", params(JobPath),
    responses((status = 200, body = JobView), (status = 404, body = crate::views::ProblemDoc, content_type = "application/problem+json"), (status = 409, body = crate::views::ProblemDoc, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub async fn retry_job(
    state: web::Data<AppState>,
    caller: OrgCaller,
    path: web::Path<JobPath>,
) -> ApiResult<HttpResponse> {
    act(&state, &caller, path.job()?, OperatorAction::Retry).await
}

/// Approve a job waiting for approval (Admin, or the `jobs:approve` permission).
#[utoipa::path(post, path = "/v1/orgs/{org_id}/jobs/{job_id}/approve", tag = "jobs", params(JobPath),
    responses((status = 200, body = JobView), (status = 403, body = crate::views::ProblemDoc, content_type = "application/problem+json"), (status = 404, body = crate::views::ProblemDoc, content_type = "application/problem+json"), (status = 409, body = crate::views::ProblemDoc, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub async fn approve_job(
    state: web::Data<AppState>,
    caller: Authorized<ApproveJobs>,
    path: web::Path<JobPath>,
) -> ApiResult<HttpResponse> {
    act(&state, &caller, path.job()?, OperatorAction::Approve).await
}

/// Reject a job waiting for approval (Admin, or the `jobs:approve` permission).
#[utoipa::path(post, path = "/v1/orgs/{org_id}/jobs/{job_id}/reject", tag = "jobs", params(JobPath),
    responses((status = 200, body = JobView), (status = 403, body = crate::views::ProblemDoc, content_type = "application/problem+json"), (status = 404, body = crate::views::ProblemDoc, content_type = "application/problem+json"), (status = 409, body = crate::views::ProblemDoc, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub async fn reject_job(
    state: web::Data<AppState>,
    caller: Authorized<ApproveJobs>,
    path: web::Path<JobPath>,
) -> ApiResult<HttpResponse> {
    act(&state, &caller, path.job()?, OperatorAction::Reject).await
}

pub(crate) fn job_id_param(raw: &str) -> ApiResult<JobId> {
    raw.parse().map_err(|_| ApiError::NotFound("job"))
}
