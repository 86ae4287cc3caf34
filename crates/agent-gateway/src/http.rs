//! The HTTP pull API, for agents that cannot hold a gRPC stream. Same
//! leases, epochs and log offsets as the session, so an agent may switch
//! transport in the middle of a job.
//!
//! | route | does |
//! |---|---|
//! | `POST /v1/agent/auth` | agent secret (`Authorization: Bearer`) → short-lived session token |
//! | `POST /v1/agent/claim` | long-poll (up to `AGENT_CLAIM_MAX_WAIT_MS`) for up to N assignments; 204 if none |
//! | `POST /v1/agent/jobs/{id}/extend` | renew the lease; says whether a cancel is pending |
//! | `POST /v1/agent/jobs/{id}/logs` | append output at a byte offset; 416 + committed offset on mismatch |
//! | `POST /v1/agent/jobs/{id}/result` | succeeded / failed / cancelled (cancel acknowledged) |
//! | `POST /v1/agent/jobs/{id}/release` | give the job back, to run again after a delay |
//!
//! Errors are problem+json: 401 bad token, 404 unknown job, 409 stale epoch,
//! 410 cancelled job, 413 oversized chunk, 416 log offset mismatch.

use std::collections::HashMap;
use std::time::Duration;

use actix_web::http::StatusCode;
use actix_web::{HttpRequest, HttpResponse, ResponseError, web};
use chrono::{DateTime, Utc};
use domain::JobId;
use domain::agent::AgentStatus;
use domain::events::{Event, LogStream, TraceContext};
use domain::job::JobStatus;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::core::{AgentContext, AssignmentView, Finish, Gateway, LogAppend};
use crate::error::GatewayError;
use crate::tokens::{self, TokenSession};
use bus::Channel;

/// Header carrying the committed log offset on a 416 answer.
pub const COMMITTED_OFFSET_HEADER: &str = "Job-Log-Committed-Offset";

pub fn configure(cfg: &mut web::ServiceConfig, gateway: Gateway) {
    cfg.app_data(web::Data::new(gateway))
        .app_data(web::JsonConfig::default().limit(8 * 1024 * 1024))
        .route("/v1/agent/auth", web::post().to(create_session_token))
        .route("/v1/agent/claim", web::post().to(claim_jobs))
        .route("/v1/agent/jobs/{id}/extend", web::post().to(extend_lease))
        .route("/v1/agent/jobs/{id}/logs", web::post().to(append_logs))
        .route("/v1/agent/jobs/{id}/result", web::post().to(report_result))
        .route("/v1/agent/jobs/{id}/release", web::post().to(release_job));
}

impl ResponseError for GatewayError {
    fn status_code(&self) -> StatusCode {
        self.http_status()
    }

    fn error_response(&self) -> HttpResponse {
        self.log();
        let problem = self.problem();
        let mut body = serde_json::to_value(&problem).unwrap_or_default();
        let mut response = HttpResponse::build(self.http_status());
        response.content_type(service_kit::problem::CONTENT_TYPE);
        match self {
            GatewayError::OffsetGap { committed, .. } => {
                body["committed_offset"] = (*committed).into();
                response.insert_header((COMMITTED_OFFSET_HEADER, committed.to_string()));
            }
            GatewayError::Stale { current, .. } => {
                body["current_epoch"] = (*current).into();
            }
            _ => {}
        }
        response.json(body)
    }
}

fn bearer(req: &HttpRequest) -> Result<&str, GatewayError> {
    req.headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .ok_or(GatewayError::Unauthenticated(
            "missing `Authorization: Bearer <token>` header",
        ))
}

/// The agent behind the request's session token; a revoked agent is refused
/// even while its token lingers.
async fn authenticate(gateway: &Gateway, req: &HttpRequest) -> Result<AgentContext, GatewayError> {
    let token = bearer(req)?;
    let session = tokens::resolve(&gateway.bus, token, gateway.settings.http_token_ttl)
        .await?
        .ok_or(GatewayError::Unauthenticated(
            "unknown or expired session token; get a new one from POST /v1/agent/auth",
        ))?;
    let mut conn = gateway.conn().await?;
    let agent = db::sessions::agent(&mut conn, session.agent_id)
        .await
        .map_err(|e| GatewayError::from_db(None, e))?;
    if agent.revoked_at.is_some() || agent.status() == AgentStatus::Revoked {
        tokens::revoke_all(&gateway.bus, session.agent_id).await;
        return Err(GatewayError::Unauthenticated(
            "this agent's credential was revoked",
        ));
    }
    Ok(AgentContext {
        id: session.agent_id,
        org: session.org_id,
        session_id: session.session_id,
    })
}

fn job_id(path: &web::Path<String>) -> Result<JobId, GatewayError> {
    path.parse()
        .map_err(|_| GatewayError::invalid(format!("job id {:?} is not a UUID", path.as_str())))
}

#[derive(Serialize)]
struct SessionToken {
    token: String,
    agent_id: String,
    org_id: String,
    expires_in_ms: u64,
    heartbeat_interval_ms: u64,
    lease_ttl_ms: u64,
    max_log_chunk_bytes: usize,
}

/// Exchanges the agent secret (`Authorization: Bearer <secret>`) for a
/// session token whose lifetime slides while it is used.
async fn create_session_token(
    gateway: web::Data<Gateway>,
    req: HttpRequest,
) -> Result<HttpResponse, GatewayError> {
    let secret = bearer(&req)?;
    let agent = gateway.authenticate(secret).await?;
    let ctx = AgentContext::from_agent(&agent, Uuid::now_v7())?;
    let settings = &gateway.settings;
    let token = tokens::issue(
        &gateway.bus,
        &TokenSession {
            agent_id: ctx.id,
            org_id: ctx.org.clone(),
            session_id: ctx.session_id,
        },
        settings.http_token_ttl,
    )
    .await?;
    Ok(HttpResponse::Ok().json(SessionToken {
        token,
        agent_id: ctx.id.to_string(),
        org_id: ctx.org.to_string(),
        expires_in_ms: settings.http_token_ttl.as_millis() as u64,
        heartbeat_interval_ms: settings.heartbeat_interval.as_millis() as u64,
        lease_ttl_ms: settings.lease_ttl.as_millis() as u64,
        max_log_chunk_bytes: settings.log_chunk_max_bytes,
    }))
}

#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct ClaimRequest {
    /// Most jobs to return (default 1).
    max_jobs: Option<u32>,
    /// Longest wait in milliseconds (default and cap: `AGENT_CLAIM_MAX_WAIT_MS`).
    wait_ms: Option<u64>,
}

#[derive(Serialize)]
pub struct JobSpecJson {
    pub org_id: String,
    pub queue: String,
    pub command: Option<String>,
    pub prompt: Option<String>,
    pub metadata: serde_json::Value,
    pub run_timeout_ms: Option<u64>,
    pub required_labels: Vec<String>,
    pub repository_id: Option<Uuid>,
}

#[derive(Serialize)]
pub struct AssignmentJson {
    pub job_id: JobId,
    pub epoch: u64,
    pub attempt: u32,
    pub lease_expires_at: DateTime<Utc>,
    pub deadline: Option<DateTime<Utc>>,
    pub spec: JobSpecJson,
    /// The job's W3C trace context: send it back as the `traceparent`
    /// (and `tracestate`) header of the requests about this job.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tracestate: Option<String>,
}

impl From<AssignmentView> for AssignmentJson {
    fn from(view: AssignmentView) -> Self {
        Self {
            job_id: view.job_id,
            epoch: view.epoch,
            attempt: view.attempt,
            lease_expires_at: view.lease_expires_at,
            deadline: view.deadline,
            spec: JobSpecJson {
                org_id: view.org_id,
                queue: view.queue,
                command: view.command,
                prompt: view.prompt,
                metadata: view.metadata,
                run_timeout_ms: view.run_timeout_ms,
                required_labels: view.required_labels,
                repository_id: view.repository_id,
            },
            traceparent: None,
            tracestate: None,
        }
    }
}

impl AssignmentJson {
    /// The assignment with the job's trace context: the offer's when this
    /// request saw it, continued in a span of its own; else the claim's.
    fn traced(view: AssignmentView, offered: Option<&TraceContext>) -> Self {
        let span = tracing::info_span!(
            "assignment",
            job.id = %view.job_id,
            job.epoch = view.epoch,
            trace_id = tracing::field::Empty
        );
        telemetry::adopt_trace(&span, offered);
        // Without a recording tracer, pass the offer's context on as is.
        let trace = telemetry::trace_context_of(&span).or_else(|| offered.cloned());
        let mut json = Self::from(view);
        if let Some(trace) = trace {
            json.traceparent = Some(trace.traceparent);
            json.tracestate = trace.tracestate;
        }
        json
    }
}

#[derive(Serialize)]
struct Claimed {
    jobs: Vec<AssignmentJson>,
}

/// Long-polls for assignments. The agent is online while it polls; each
/// job returned is acknowledged (running) with the lease TTL.
async fn claim_jobs(
    gateway: web::Data<Gateway>,
    req: HttpRequest,
    body: Option<web::Json<ClaimRequest>>,
) -> Result<HttpResponse, GatewayError> {
    let ctx = authenticate(&gateway, &req).await?;
    let body = body.map(web::Json::into_inner).unwrap_or_default();
    let settings = &gateway.settings;
    let max_jobs = body.max_jobs.unwrap_or(1).clamp(1, settings.claim_max_jobs) as usize;
    let wait = body
        .wait_ms
        .map_or(settings.claim_max_wait, Duration::from_millis)
        .min(settings.claim_max_wait);
    let deadline = tokio::time::Instant::now() + wait;
    // Listen before going online, so no offer made meanwhile is missed.
    let mut events = Box::pin(gateway.bus.subscribe(&[Channel::Agent(ctx.id)]).await?);
    let agent = {
        let mut conn = gateway.conn().await?;
        db::sessions::agent(&mut conn, ctx.id)
            .await
            .map_err(|e| GatewayError::from_db(None, e))?
    };
    gateway
        .open_session(&agent, ctx.session_id, &[], 0, &agent.version)
        .await?;
    let mut claimed = Vec::new();
    // Trace contexts of the offers seen while waiting, by job.
    let mut offered: HashMap<JobId, TraceContext> = HashMap::new();
    loop {
        for view in gateway.pending_assignments(&ctx).await? {
            if claimed.len() >= max_jobs {
                break;
            }
            match gateway.acknowledge(&ctx, view.job_id, view.epoch).await {
                Ok(job) => {
                    let mut view = view;
                    view.lease_expires_at = job.lease_expires_at.unwrap_or(view.lease_expires_at);
                    let trace = offered.get(&view.job_id).cloned();
                    claimed.push(AssignmentJson::traced(view, trace.as_ref()));
                }
                Err(e) => e.log(),
            }
        }
        if !claimed.is_empty() {
            break;
        }
        tokio::select! {
            () = tokio::time::sleep_until(deadline) => break,
            event = events.next() => match event {
                Some(envelope) => match envelope.event {
                    Event::AssignmentOffered { job_id, .. } => {
                        if let Some(trace) = envelope.trace {
                            offered.insert(job_id, trace);
                        }
                    }
                    Event::AssignmentsOffered { offers, .. } => {
                        for offer in offers {
                            if let Some(trace) = offer.trace {
                                offered.insert(offer.job_id, trace);
                            }
                        }
                    }
                    Event::AgentRevoked { agent_id } if agent_id == ctx.id => {
                        tokens::revoke_all(&gateway.bus, ctx.id).await;
                        return Err(GatewayError::Unauthenticated("this agent's credential was revoked"));
                    }
                    _ => {}
                },
                // Bus gone: fall back to polling PostgreSQL.
                None => tokio::time::sleep(Duration::from_millis(500)).await,
            },
        }
    }
    // Offline once it stops polling for a while.
    gateway.close_session_later(&ctx, Some(settings.claim_max_wait + settings.offline_grace));
    if claimed.is_empty() {
        return Ok(HttpResponse::NoContent().finish());
    }
    Ok(HttpResponse::Ok().json(Claimed { jobs: claimed }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EpochBody {
    epoch: u64,
}

#[derive(Serialize)]
struct LeaseJson {
    job_id: JobId,
    epoch: u64,
    lease_expires_at: DateTime<Utc>,
    cancel_requested: bool,
}

/// Renews the lease. `cancel_requested: true` means stop the job and
/// report `cancelled`.
async fn extend_lease(
    gateway: web::Data<Gateway>,
    req: HttpRequest,
    path: web::Path<String>,
    body: web::Json<EpochBody>,
) -> Result<HttpResponse, GatewayError> {
    let ctx = authenticate(&gateway, &req).await?;
    let job = job_id(&path)?;
    let renewal = gateway.heartbeat(&ctx, &[(job, body.epoch)]).await?;
    match renewal.extended.first() {
        Some(lease) => Ok(HttpResponse::Ok().json(LeaseJson {
            job_id: job,
            epoch: lease.epoch.max(0) as u64,
            lease_expires_at: lease.expires_at,
            cancel_requested: lease.cancel_requested,
        })),
        None => Err(gateway.explain_unextended(&ctx, job, body.epoch).await),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LogsBody {
    epoch: u64,
    /// `stdout`, `stderr` or `system`.
    stream: String,
    /// Byte offset of `data` within the attempt's output.
    offset: u64,
    /// Whole lines of text.
    data: String,
}

#[derive(Serialize)]
struct CommittedJson {
    committed_offset: u64,
}

/// Appends output at a byte offset. A resend is harmless; a chunk that
/// would leave a gap is answered 416 with the offset to resume from.
async fn append_logs(
    gateway: web::Data<Gateway>,
    req: HttpRequest,
    path: web::Path<String>,
    body: web::Json<LogsBody>,
) -> Result<HttpResponse, GatewayError> {
    let ctx = authenticate(&gateway, &req).await?;
    let job = job_id(&path)?;
    let stream = LogStream::parse(&body.stream)
        .ok_or_else(|| GatewayError::invalid("stream must be stdout, stderr or system"))?;
    match gateway
        .append_logs(
            &ctx,
            job,
            body.epoch,
            stream,
            body.offset,
            body.data.as_bytes(),
        )
        .await?
    {
        LogAppend::Committed(committed) => Ok(HttpResponse::Ok().json(CommittedJson {
            committed_offset: committed,
        })),
        LogAppend::Gap { committed } => Err(GatewayError::OffsetGap {
            given: body.offset,
            committed,
        }),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ResultBody {
    epoch: u64,
    /// `succeeded`, `failed`, or `cancelled` (the process stopped after a cancel).
    outcome: String,
    #[serde(default)]
    exit_code: Option<i32>,
    #[serde(default)]
    error_kind: Option<String>,
    #[serde(default)]
    message: Option<String>,
}

#[derive(Serialize)]
struct StatusJson {
    job_id: JobId,
    status: JobStatus,
}

/// Reports how the attempt ended.
async fn report_result(
    gateway: web::Data<Gateway>,
    req: HttpRequest,
    path: web::Path<String>,
    body: web::Json<ResultBody>,
) -> Result<HttpResponse, GatewayError> {
    let ctx = authenticate(&gateway, &req).await?;
    let job = job_id(&path)?;
    let body = body.into_inner();
    let finish = match body.outcome.as_str() {
        "succeeded" => Finish::Succeeded {
            exit_code: body.exit_code,
        },
        "failed" => Finish::Failed {
            exit_code: body.exit_code,
            error_kind: body.error_kind,
            message: body.message,
        },
        "cancelled" => Finish::CancelAcknowledged,
        other => {
            return Err(GatewayError::invalid(format!(
                "outcome must be succeeded, failed or cancelled, got {other:?}"
            )));
        }
    };
    let status = gateway.finish(&ctx, job, body.epoch, finish).await?;
    Ok(HttpResponse::Ok().json(StatusJson {
        job_id: job,
        status,
    }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReleaseBody {
    epoch: u64,
    #[serde(default)]
    delay_ms: u64,
}

/// Gives the job back; it may run again after `delay_ms`.
async fn release_job(
    gateway: web::Data<Gateway>,
    req: HttpRequest,
    path: web::Path<String>,
    body: web::Json<ReleaseBody>,
) -> Result<HttpResponse, GatewayError> {
    let ctx = authenticate(&gateway, &req).await?;
    let job = job_id(&path)?;
    let status = gateway
        .release(&ctx, job, body.epoch, Duration::from_millis(body.delay_ms))
        .await?;
    Ok(HttpResponse::Ok().json(StatusJson {
        job_id: job,
        status,
    }))
}
