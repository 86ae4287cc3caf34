//! Operational endpoints, the same on every service:
//!
//! * `GET /healthz`: the process is alive (no dependencies checked).
//! * `GET /readyz`: 200 only while PostgreSQL and Redis answer; 503 with the
//!   failing check otherwise. Each probe is bounded to one second and they
//!   run concurrently, so a dead dependency is reported within two seconds,
//!   and recovery needs no restart (the pools reconnect by themselves).
//! * `GET /version`: name, version and git commit.
//! * `GET /metrics`: Prometheus text format.

use std::sync::Arc;
use std::time::Duration;

use actix_web::{HttpResponse, web};
use futures_util::FutureExt;
use futures_util::future::{BoxFuture, join_all};
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry, TextEncoder,
};
use serde_json::json;

/// Time one readiness probe may take.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

type Probe = Arc<dyn Fn() -> BoxFuture<'static, Result<(), String>> + Send + Sync>;

/// A named dependency check for `/readyz`.
#[derive(Clone)]
pub struct ReadinessCheck {
    pub name: &'static str,
    probe: Probe,
}

impl ReadinessCheck {
    pub fn new<F, Fut>(name: &'static str, probe: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), String>> + Send + 'static,
    {
        Self {
            name,
            probe: Arc::new(move || probe().boxed()),
        }
    }

    pub fn postgres(db: db::Db) -> Self {
        Self::new("postgres", move || {
            let db = db.clone();
            async move { db.ping().await.map_err(|e| e.to_string()) }
        })
    }

    pub fn redis(bus: bus::Bus) -> Self {
        Self::new("redis", move || {
            let bus = bus.clone();
            async move { bus.ping().await.map_err(|e| e.to_string()) }
        })
    }

    async fn run(&self) -> Result<(), String> {
        match tokio::time::timeout(PROBE_TIMEOUT, (self.probe)()).await {
            Ok(result) => result,
            Err(_) => Err(format!("no answer within {} ms", PROBE_TIMEOUT.as_millis())),
        }
    }
}

/// HTTP request metrics, recorded by the server's middleware.
#[derive(Clone)]
pub struct HttpMetrics {
    pub requests: IntCounterVec,
    pub duration: HistogramVec,
}

/// The operational state of one service.
#[derive(Clone)]
pub struct Ops {
    service: &'static str,
    version: &'static str,
    checks: Arc<Vec<ReadinessCheck>>,
    registry: Registry,
    http: HttpMetrics,
    pool: Option<(db::Db, IntGauge, IntGauge)>,
}

impl Ops {
    pub fn new(service: &'static str, version: &'static str, checks: Vec<ReadinessCheck>) -> Self {
        let registry = Registry::new_custom(Some("switchyard".into()), None)
            .expect("metric registry prefix is valid");
        #[cfg(target_os = "linux")]
        {
            let _ = registry.register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ));
        }
        let requests = IntCounterVec::new(
            Opts::new(
                "http_requests_total",
                "HTTP requests by route, method and status",
            ),
            &["route", "method", "status"],
        )
        .expect("valid metric");
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "http_request_duration_seconds",
                "HTTP request latency by route",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
            ]),
            &["route", "method"],
        )
        .expect("valid metric");
        let _ = registry.register(Box::new(requests.clone()));
        let _ = registry.register(Box::new(duration.clone()));
        bus::metrics::register(&registry);
        Self {
            service,
            version,
            checks: Arc::new(checks),
            registry,
            http: HttpMetrics { requests, duration },
            pool: None,
        }
    }

    /// Also report the PostgreSQL pool's saturation on `/metrics`.
    pub fn with_pool_metrics(mut self, db: db::Db) -> Self {
        let in_use = IntGauge::new(
            "db_pool_connections_in_use",
            "PostgreSQL connections in use",
        )
        .expect("metric");
        let max = IntGauge::new("db_pool_connections_max", "PostgreSQL pool size").expect("metric");
        let _ = self.registry.register(Box::new(in_use.clone()));
        let _ = self.registry.register(Box::new(max.clone()));
        self.pool = Some((db, in_use, max));
        self
    }

    pub fn service(&self) -> &'static str {
        self.service
    }

    /// The registry services add their own metrics to.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    pub fn http_metrics(&self) -> &HttpMetrics {
        &self.http
    }

    /// Runs every readiness check concurrently.
    pub async fn readiness(&self) -> (bool, serde_json::Value) {
        let results = join_all(
            self.checks
                .iter()
                .map(|check| async move { (check.name, check.run().await) }),
        )
        .await;
        let ready = results.iter().all(|(_, r)| r.is_ok());
        let checks: serde_json::Map<String, serde_json::Value> = results
            .into_iter()
            .map(|(name, result)| {
                let value = match result {
                    Ok(()) => json!("ok"),
                    Err(error) => json!(format!("error: {error}")),
                };
                (name.to_owned(), value)
            })
            .collect();
        (
            ready,
            json!({ "status": if ready { "ready" } else { "not_ready" }, "checks": checks }),
        )
    }

    pub fn render_metrics(&self) -> String {
        if let Some((db, in_use, max)) = &self.pool {
            let (used, size) = db.pool_usage();
            in_use.set(used as i64);
            max.set(size as i64);
        }
        let mut buffer = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buffer);
        String::from_utf8(buffer).unwrap_or_default()
    }

    /// Mounts the four endpoints.
    pub fn configure(&self, cfg: &mut web::ServiceConfig) {
        cfg.app_data(web::Data::new(self.clone()))
            .route("/healthz", web::get().to(healthz))
            .route("/readyz", web::get().to(readyz))
            .route("/version", web::get().to(version))
            .route("/metrics", web::get().to(metrics));
    }
}

/// The value of one series in Prometheus text output: `series` is the
/// metric name with its labels exactly as rendered (for example
/// `switchyard_http_requests_total{method="GET",route="/healthz",status="200"}`),
/// or the bare name of an unlabelled metric. For tests and checks.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            let (name, value) = line.rsplit_once(' ')?;
            (name == series).then(|| value.parse().ok())?
        })
}

/// The sum of every series of `metric` (all label values), for tests.
pub fn sum(text: &str, metric: &str) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (name, value) = line.rsplit_once(' ')?;
            let bare = name.split('{').next()?;
            (bare == metric).then(|| value.parse::<f64>().ok())?
        })
        .sum()
}

async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(json!({ "status": "ok" }))
}

async fn readyz(ops: web::Data<Ops>) -> HttpResponse {
    let (ready, body) = ops.readiness().await;
    if ready {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable().json(body)
    }
}

async fn version(ops: web::Data<Ops>) -> HttpResponse {
    HttpResponse::Ok().json(json!({
        "name": ops.service,
        "version": ops.version,
        "git_commit": crate::GIT_COMMIT,
    }))
}

async fn metrics(ops: web::Data<Ops>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(ops.render_metrics())
}
