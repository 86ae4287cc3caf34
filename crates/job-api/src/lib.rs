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
mod error;
mod openapi;
pub mod routes;
mod state;
pub mod views;

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::Duration;

use actix_web::web;
use service_kit::config::{CommonConfig, ConfigError, Source, address, parsed};
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
#[derive(Clone, Debug)]
pub struct Config {
    pub common: CommonConfig,
    pub addr: SocketAddr,
    pub auth: auth::AuthConfig,
    pub cancel_grace: Duration,
}

impl ServiceConfig for Config {
    fn from_source(source: &dyn Source) -> Result<Self, ConfigError> {
        Ok(Self {
            common: CommonConfig::from_source(SERVICE, source)?,
            addr: address(source, "JOB_API_ADDR", "127.0.0.1:8080")?,
            auth: auth::AuthConfig::from_source(source)?,
            cancel_grace: Duration::from_millis(parsed(source, "CANCEL_GRACE_MS", 30_000u64)?),
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
    )));
    let openapi = ApiDoc::openapi();
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
                        .configure(routes::orgs::configure)
                        .configure(routes::repositories::configure)
                        .configure(routes::jobs::configure)
                        .configure(routes::queues::configure)
                        .configure(routes::agents::configure)
                        .configure(routes::operations::configure),
                )
                .service(SwaggerUi::new("/docs/{_:.*}").url("/openapi.json", openapi.clone()))
                .default_service(web::to(not_found));
        },
    )
    .await?;
    Ok(())
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
