//! job-api: the REST door for clients (web, CLI, scripts): orgs,
//! repositories, jobs, queues, agents, approvals, audit and stats.
//!
//! Handlers only translate: validation and state rules live in `domain`,
//! statements in `db`. Writes commit first, then publish on Redis (a lost
//! message is repaired by the scheduler's sweep). Errors are RFC 9457
//! problem+json; every request carries an `X-Request-ID`.
//!
//! A library with one entry point, [`run`], so tests start the real service
//! in-process; `main.rs` only reads the config and binds.

mod caller;
mod creates;
mod error;
mod openapi;
pub mod routes;
mod state;
pub mod views;

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::Duration;

use actix_web::web;
use service_kit::config::{CommonConfig, ConfigError, Source, address, flag_or, optional, parsed};
use service_kit::launch::{Foundation, ServiceConfig};
use tokio_util::sync::CancellationToken;
use utoipa::OpenApi;
use utoipa_swagger_ui::SwaggerUi;

pub use openapi::ApiDoc;

pub const SERVICE: &str = "job-api";

/// Largest accepted request body (413 beyond).
pub const BODY_LIMIT_BYTES: usize = 1024 * 1024;

/// Typed configuration; shared variables are documented in
/// [`service_kit::config`], the `AUTH_*` ones in [`auth::config`].
///
/// | variable | default | meaning |
/// |---|---|---|
/// | `JOB_API_ADDR` | `127.0.0.1:8080` | listen address |
/// | `CANCEL_GRACE_MS` | `30000` | time a cancelled job has to stop before the cancel is forced |
/// | `JOB_API_CORS_ORIGINS` | `http://127.0.0.1:8090,http://localhost:8090` | browser origins allowed to call the API (the dashboard's); `*` for any |
/// | `JOB_API_LEASE_ON_CREATE` | `true` | a single job due at once, created while its org has nothing else ready, is leased to a free agent in its create's own transaction instead of waiting for the scheduler |
/// | `SCHEDULER_ACK_TIMEOUT_MS` | `10000` | time an agent has to acknowledge such a lease (the scheduler's setting) |
#[derive(Clone, Debug)]
pub struct Config {
    pub common: CommonConfig,
    pub addr: SocketAddr,
    pub auth: auth::AuthConfig,
    pub cancel_grace: Duration,
    pub cors_origins: Vec<String>,
    /// The ack timeout of leases granted on create; `None`: leave every
    /// job to the scheduler.
    pub lease_on_create: Option<Duration>,
}

/// The dashboard's origin when run by `scripts/dev.sh`.
pub const DEFAULT_CORS_ORIGINS: &str = "http://127.0.0.1:8090,http://localhost:8090";

impl ServiceConfig for Config {
    fn from_source(source: &dyn Source) -> Result<Self, ConfigError> {
        Ok(Self {
            common: CommonConfig::from_source(SERVICE, source)?,
            addr: address(source, "JOB_API_ADDR", "127.0.0.1:8080")?,
            auth: auth::AuthConfig::from_source(source)?,
            cancel_grace: Duration::from_millis(parsed(source, "CANCEL_GRACE_MS", 30_000u64)?),
            cors_origins: optional(source, "JOB_API_CORS_ORIGINS")
                .unwrap_or_else(|| DEFAULT_CORS_ORIGINS.to_owned())
                .split(',')
                .map(|o| o.trim().trim_end_matches('/').to_owned())
                .filter(|o| !o.is_empty())
                .collect(),
            lease_on_create: flag_or(source, "JOB_API_LEASE_ON_CREATE", true)?
                .then(|| parsed(source, "SCHEDULER_ACK_TIMEOUT_MS", 10_000u64))
                .transpose()?
                .map(Duration::from_millis),
        })
    }

    fn common(&self) -> &CommonConfig {
        &self.common
    }
}

/// Serves until `shutdown` is cancelled, then drains and returns.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let foundation = Foundation::new(&config.common, env!("CARGO_PKG_VERSION"))?;
    let verifier = auth::Verifier::new(config.auth.clone())?;
    let state = web::Data::from(Arc::new(state::AppState::new(
        foundation.db.clone(),
        foundation.bus.clone(),
        verifier,
        config.cancel_grace,
        config.lease_on_create,
        foundation.ops.registry(),
    )));
    let openapi = ApiDoc::openapi();
    let origins = config.cors_origins.clone();
    service_kit::http::serve(
        listener,
        &config.common.http,
        foundation.ops.clone(),
        shutdown,
        move |cfg| {
            cfg.app_data(state.clone())
                .app_data(
                    web::JsonConfig::default()
                        .limit(BODY_LIMIT_BYTES)
                        .error_handler(json_error),
                )
                .app_data(web::QueryConfig::default().error_handler(query_error))
                .app_data(web::PathConfig::default().error_handler(path_error))
                .service(
                    web::scope("/v1")
                        .wrap(cors(&origins))
                        .configure(routes::orgs::configure)
                        .configure(routes::repositories::configure)
                        .configure(routes::jobs::configure)
                        .configure(routes::queues::configure)
                        .configure(routes::agents::configure)
                        .configure(routes::operations::configure)
                        // Gives browser preflights a route to reach the CORS middleware, which answers them.
                        .route(
                            "/{tail:.*}",
                            web::method(actix_web::http::Method::OPTIONS)
                                .to(actix_web::HttpResponse::NoContent),
                        ),
                )
                .service(SwaggerUi::new("/docs/{_:.*}").url("/openapi.json", openapi.clone()))
                .default_service(web::to(not_found));
        },
    )
    .await?;
    Ok(())
}

/// Lets the dashboard (served by the broadcaster, another origin) call the
/// API. Credentials travel in the Authorization header, never cookies.
fn cors(origins: &[String]) -> actix_cors::Cors {
    let mut cors = actix_cors::Cors::default()
        .allowed_methods(["GET", "POST", "PATCH", "DELETE"])
        .allowed_headers([
            actix_web::http::header::AUTHORIZATION,
            actix_web::http::header::CONTENT_TYPE,
            actix_web::http::header::HeaderName::from_static("idempotency-key"),
            actix_web::http::header::HeaderName::from_static("x-request-id"),
        ])
        .expose_headers(["x-request-id", "idempotent-replayed"])
        .max_age(600);
    for origin in origins {
        cors = if origin == "*" {
            cors.allow_any_origin()
        } else {
            cors.allowed_origin(origin)
        };
    }
    cors
}

async fn not_found() -> error::ApiResult<actix_web::HttpResponse> {
    Err(error::ApiError::NotFound("route"))
}

fn json_error(
    err: actix_web::error::JsonPayloadError,
    _: &actix_web::HttpRequest,
) -> actix_web::Error {
    use actix_web::error::JsonPayloadError;
    let problem = match &err {
        JsonPayloadError::OverflowKnownLength { .. } | JsonPayloadError::Overflow { .. } => {
            service_kit::problem::Problem::new(
                actix_web::http::StatusCode::PAYLOAD_TOO_LARGE,
                "body-too-large",
                "Request body too large",
            )
            .detail(format!("the body limit is {BODY_LIMIT_BYTES} bytes"))
        }
        JsonPayloadError::ContentType => service_kit::problem::Problem::new(
            actix_web::http::StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "content-type",
            "Unsupported content type",
        )
        .detail("send Content-Type: application/json"),
        other => service_kit::problem::Problem::new(
            actix_web::http::StatusCode::BAD_REQUEST,
            "malformed-json",
            "Malformed JSON body",
        )
        .detail(other.to_string()),
    };
    actix_web::error::InternalError::from_response(err, problem.response()).into()
}

fn query_error(
    err: actix_web::error::QueryPayloadError,
    _: &actix_web::HttpRequest,
) -> actix_web::Error {
    let problem = service_kit::problem::Problem::new(
        actix_web::http::StatusCode::UNPROCESSABLE_ENTITY,
        "validation",
        "Invalid query string",
    )
    .detail(err.to_string());
    actix_web::error::InternalError::from_response(err, problem.response()).into()
}

fn path_error(err: actix_web::error::PathError, _: &actix_web::HttpRequest) -> actix_web::Error {
    let problem = service_kit::problem::Problem::new(
        actix_web::http::StatusCode::NOT_FOUND,
        "not-found",
        "Not found",
    );
    actix_web::error::InternalError::from_response(err, problem.response()).into()
}
