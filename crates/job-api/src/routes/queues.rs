//! Queues (depth, wait, throughput; ordered entries with position and ETA;
//! reorder) and org statistics.

use actix_web::{HttpResponse, web};
use bus::Channel;
use chrono::{DateTime, Utc};
use db::queues::Placement;
use domain::events::Event;
use domain::job::QueueName;
use domain::scheduling::order;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use crate::caller::{Authorized, OrgCaller, ReorderJobs};
use crate::error::{ApiError, ApiResult};
use crate::state::AppState;
use crate::views::JobView;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/orgs/{org_id}/queues", web::get().to(list_queues))
        .route("/orgs/{org_id}/queues/{queue}", web::get().to(get_queue))
        .route(
            "/orgs/{org_id}/queues/{queue}/reorder",
            web::post().to(reorder_queue),
        )
        .route("/orgs/{org_id}/stats", web::get().to(get_stats));
}

#[derive(Serialize, ToSchema)]
pub struct QueueView {
    pub queue: String,
    pub queued: i64,
    pub pending_approval: i64,
    pub running: i64,
    /// Seconds the oldest queued job has waited.
    pub oldest_wait_secs: Option<i64>,
    /// Jobs finished per minute over the last 10 minutes.
    pub throughput_per_min: f64,
}

#[derive(Serialize, ToSchema)]
pub struct QueueList {
    pub queues: Vec<QueueView>,
}

fn to_view(summary: db::queues::QueueSummary) -> QueueView {
    QueueView {
        oldest_wait_secs: summary
            .oldest_queued_at
            .map(|at| (Utc::now() - at).num_seconds().max(0)),
        throughput_per_min: summary.finished_last_10m as f64 / 10.0,
        queue: summary.queue,
        queued: summary.queued,
        pending_approval: summary.pending_approval,
        running: summary.running,
    }
}

/// Every queue with work: depth, running, oldest wait, recent throughput.
#[utoipa::path(get, path = "/v1/orgs/{org_id}/queues", tag = "queues", params(("org_id" = String, Path)),
    responses((status = 200, body = QueueList)), security(("bearer" = [])))]
pub async fn list_queues(state: web::Data<AppState>, caller: OrgCaller) -> ApiResult<HttpResponse> {
    let mut conn = state.db.conn().await?;
    let mut queues: Vec<QueueView> = db::queues::summaries(&mut conn, &caller.org)
        .await?
        .into_iter()
        .map(to_view)
        .collect();
    for builtin in [QueueName::REWORK, QueueName::BACKLOG] {
        if !queues.iter().any(|q| q.queue == builtin) {
            queues.push(QueueView {
                queue: builtin.to_owned(),
                queued: 0,
                pending_approval: 0,
                running: 0,
                oldest_wait_secs: None,
                throughput_per_min: 0.0,
            });
        }
    }
    queues.sort_by(|a, b| a.queue.cmp(&b.queue));
    Ok(HttpResponse::Ok().json(QueueList { queues }))
}

#[derive(Deserialize)]
pub struct QueuePath {
    pub org_id: String,
    pub queue: String,
}

impl QueuePath {
    fn queue(&self) -> ApiResult<QueueName> {
        QueueName::parse(self.queue.clone()).map_err(|_| ApiError::NotFound("queue"))
    }
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct EntriesQuery {
    /// 1..=500, default 50.
    pub limit: Option<u32>,
}

#[derive(Serialize, ToSchema)]
pub struct QueueEntry {
    /// 1-based place in the org's dispatch order (all queues).
    pub position: u64,
    /// Estimated start, from the org's recent throughput (null when idle).
    pub eta: Option<DateTime<Utc>>,
    pub job_id: Uuid,
    pub priority: i32,
    pub labels: Vec<String>,
}

#[derive(Serialize, ToSchema)]
pub struct QueueDetail {
    #[serde(flatten)]
    pub summary: QueueView,
    pub entries: Vec<QueueEntry>,
}

/// A queue's due entries in dispatch order, with position and ETA.
#[utoipa::path(get, path = "/v1/orgs/{org_id}/queues/{queue}", tag = "queues",
    params(("org_id" = String, Path), ("queue" = String, Path), EntriesQuery),
    responses((status = 200, body = QueueDetail), (status = 404, body = crate::views::ProblemDoc, content_type = "application/problem+json")), security(("bearer" = [])))]
pub async fn get_queue(
    state: web::Data<AppState>,
    caller: OrgCaller,
    path: web::Path<QueuePath>,
    query: web::Query<EntriesQuery>,
) -> ApiResult<HttpResponse> {
    let queue = path.queue()?;
    let limit = query.limit.unwrap_or(50);
    if limit == 0 || limit > 500 {
        return Err(ApiError::invalid("limit", "must be 1 to 500"));
    }
    let mut conn = state.db.conn().await?;
    let summaries = db::queues::summaries(&mut conn, &caller.org).await?;
    let throughput_per_sec: f64 = summaries
        .iter()
        .map(|s| s.finished_last_10m as f64)
        .sum::<f64>()
        / 600.0;
    let summary = summaries
        .into_iter()
        .find(|s| s.queue == queue.as_str())
        .map(to_view)
        .unwrap_or(QueueView {
            queue: queue.to_string(),
            queued: 0,
            pending_approval: 0,
            running: 0,
            oldest_wait_secs: None,
            throughput_per_min: 0.0,
        });
    let mut ready = db::dispatch::queued_candidates(&mut conn, &caller.org, 100_000).await?;
    let settings = db::orgs::settings(&mut conn, &caller.org).await?;
    order(
        &mut ready,
        Utc::now(),
        Some(std::time::Duration::from_secs(60)),
    );
    let rank = settings.queue_rank(&queue);
    let now = Utc::now();
    let entries = ready
        .iter()
        .enumerate()
        .filter(|(_, c)| c.queue_rank == rank)
        .take(limit as usize)
        .map(|(i, c)| QueueEntry {
            position: i as u64 + 1,
            eta: (throughput_per_sec > 0.0).then(|| {
                now + chrono::Duration::milliseconds(
                    ((i as f64) / throughput_per_sec * 1000.0) as i64,
                )
            }),
            job_id: c.job_id.as_uuid(),
            priority: c.priority,
            labels: c.required_labels.to_vec(),
        })
        .collect();
    Ok(HttpResponse::Ok().json(QueueDetail { summary, entries }))
}

/// Move a job just before or just after another job of the same queue, or
/// to a 1-based position in the queue. Give exactly one of the three.
#[derive(Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReorderRequest {
    pub job_id: Uuid,
    pub before: Option<Uuid>,
    pub after: Option<Uuid>,
    pub position: Option<u64>,
}

/// Reorder a queue (Admin or `jobs:reorder`).
#[utoipa::path(post, path = "/v1/orgs/{org_id}/queues/{queue}/reorder", tag = "queues",
    params(("org_id" = String, Path), ("queue" = String, Path)), request_body = ReorderRequest,
    responses((status = 200, body = JobView), (status = 403, body = crate::views::ProblemDoc, content_type = "application/problem+json"), (status = 404, body = crate::views::ProblemDoc, content_type = "application/problem+json"), (status = 422, body = crate::views::ProblemDoc, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub async fn reorder_queue(
    state: web::Data<AppState>,
    caller: Authorized<ReorderJobs>,
    path: web::Path<QueuePath>,
    body: web::Json<ReorderRequest>,
) -> ApiResult<HttpResponse> {
    let queue = path.queue()?;
    let mut conn = state.db.conn().await?;
    let placement = match (body.before, body.after, body.position) {
        (Some(before), None, None) => Placement::Before(domain::JobId(before)),
        (None, Some(after), None) => Placement::After(domain::JobId(after)),
        (None, None, Some(position)) => {
            placement_at(
                &mut conn,
                &caller.org,
                &queue,
                domain::JobId(body.job_id),
                position,
            )
            .await?
        }
        _ => {
            return Err(ApiError::invalid(
                "before",
                "give exactly one of before, after or position",
            ));
        }
    };
    let job = db::jobs::get(&mut conn, &caller.org, domain::JobId(body.job_id))
        .await
        .map_err(|_| ApiError::NotFound("job"))?;
    if job.queue != queue.as_str() {
        return Err(ApiError::NotFound("job"));
    }
    let moved = db::queues::reorder(&mut conn, &caller.org, job.job_id(), placement).await?;
    db::audit::record(
        &mut conn,
        db::audit::Record {
            org: &caller.org,
            actor: &caller.actor(),
            action: "job.reordered",
            target_type: "job",
            target_id: job.id.to_string(),
            request_id: caller.request_id(),
            details: serde_json::json!({ "before": body.before, "after": body.after }),
        },
    )
    .await?;
    state
        .publish(
            Channel::Org(caller.org.clone()),
            &caller.org,
            Event::QueueChanged { queue },
            caller.request_id(),
        )
        .await;
    Ok(HttpResponse::Ok().json(JobView::from(&moved)))
}

/// Turns "position N of this queue" into a place relative to the job now
/// there, using the queue's own order (as its entries are listed).
async fn placement_at(
    conn: &mut db::PgConn,
    org: &domain::OrgId,
    queue: &QueueName,
    moving: domain::JobId,
    position: u64,
) -> ApiResult<Placement> {
    if position == 0 {
        return Err(ApiError::invalid("position", "positions start at 1"));
    }
    let waiting = db::queues::waiting_order(conn, org, queue).await?;
    let others: Vec<domain::JobId> = waiting.into_iter().filter(|id| *id != moving).collect();
    let Some(last) = others.last().copied() else {
        return Err(ApiError::invalid(
            "position",
            "the job is alone in its queue",
        ));
    };
    Ok(match others.get(position as usize - 1) {
        Some(at) => Placement::Before(*at),
        None => Placement::After(last),
    })
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct StatsQuery {
    /// Window such as `15m`, `1h`, `24h`, `7d` (default `1h`).
    pub window: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct StatsView {
    pub window_secs: i64,
    #[schema(value_type = Object)]
    pub jobs: db::queues::WindowStats,
    /// Jobs finished per minute in the window.
    pub throughput_per_min: f64,
    #[schema(value_type = Vec<Object>)]
    pub agents: Vec<db::queues::AgentStats>,
}

fn parse_window(raw: &str) -> Option<i64> {
    let unit = raw.chars().last()?;
    let number = &raw[..raw.len() - unit.len_utf8()];
    let n: i64 = number.parse().ok().filter(|n| *n > 0)?;
    let secs = match unit {
        's' => n,
        'm' => n.checked_mul(60)?,
        'h' => n.checked_mul(3_600)?,
        'd' => n.checked_mul(86_400)?,
        _ => return None,
    };
    (secs <= 30 * 86_400).then_some(secs)
}

/// Jobs by status, throughput, p50/p95 queue wait and run time, per-agent success rate.
#[utoipa::path(get, path = "/v1/orgs/{org_id}/stats", tag = "stats", params(("org_id" = String, Path), StatsQuery),
    responses((status = 200, body = StatsView), (status = 422, body = crate::views::ProblemDoc, content_type = "application/problem+json")), security(("bearer" = [])))]
pub async fn get_stats(
    state: web::Data<AppState>,
    caller: OrgCaller,
    query: web::Query<StatsQuery>,
) -> ApiResult<HttpResponse> {
    let window_secs = match &query.window {
        None => 3_600,
        Some(raw) => parse_window(raw)
            .ok_or_else(|| ApiError::invalid("window", "like 15m, 1h, 24h or 7d; at most 30d"))?,
    };
    let mut conn = state.db.conn().await?;
    let jobs = db::queues::window_stats(&mut conn, &caller.org, window_secs).await?;
    let agents = db::queues::agent_stats(&mut conn, &caller.org, window_secs).await?;
    let finished = jobs.succeeded + jobs.failed + jobs.cancelled + jobs.timed_out + jobs.dead;
    Ok(HttpResponse::Ok().json(StatsView {
        window_secs,
        throughput_per_min: finished as f64 / (window_secs as f64 / 60.0),
        jobs,
        agents,
    }))
}

#[cfg(test)]
mod tests {
    use super::parse_window;

    #[test]
    fn windows_parse_with_units_and_bounds() {
        assert_eq!(parse_window("15m"), Some(900));
        assert_eq!(parse_window("1h"), Some(3_600));
        assert_eq!(parse_window("7d"), Some(604_800));
        assert_eq!(parse_window("31d"), None);
        assert_eq!(parse_window("0h"), None);
        assert_eq!(parse_window("h"), None);
        assert_eq!(parse_window(""), None);
        assert_eq!(parse_window("5x"), None);
        assert_eq!(parse_window("\u{f6b6b}"), None, "non-ASCII must not panic");
        assert_eq!(parse_window("9999999999999999d"), None);
    }
}
