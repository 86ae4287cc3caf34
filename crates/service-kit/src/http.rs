//! The HTTP server every service runs: actix-web on a listener handed in by
//! the caller (port 0 in tests), with keep-alive and timeouts from
//! [`HttpConfig`], request metrics, a per-request deadline answered with a
//! problem document, and graceful shutdown when the token is cancelled.

use std::net::TcpListener;
use std::time::Instant;

use actix_web::body::{BoxBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::StatusCode;
use actix_web::middleware::{Next, from_fn};
use actix_web::{App, HttpServer, web};
use tokio_util::sync::CancellationToken;

use crate::config::HttpConfig;
use crate::ops::Ops;
use crate::problem::Problem;

#[derive(Clone, Copy)]
struct RequestDeadline(std::time::Duration);

/// The request's id: the client's `X-Request-ID` when it is sane, else a
/// new UUIDv7. Returned on the response, logged, and carried into bus
/// events so one request can be followed everywhere.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestId(pub String);

pub const REQUEST_ID_HEADER: &str = "x-request-id";

fn request_id_of(req: &ServiceRequest) -> String {
    req.headers()
        .get(REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.chars().all(|c| c.is_ascii_graphic()))
        .map(str::to_owned)
        .unwrap_or_else(|| uuid::Uuid::now_v7().to_string())
}

/// Probes and scrapes: logged at debug, not to drown the access log.
fn is_ops_path(path: &str) -> bool {
    matches!(path, "/healthz" | "/readyz" | "/metrics" | "/version")
}

/// The W3C trace context the client sent, if any.
fn incoming_trace(req: &ServiceRequest) -> Option<domain::events::TraceContext> {
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    header("traceparent").map(|traceparent| domain::events::TraceContext {
        traceparent,
        tracestate: header("tracestate").filter(|s| !s.is_empty()),
    })
}

async fn deadline_and_metrics(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<BoxBody>, actix_web::Error> {
    use actix_web::HttpMessage;
    use tracing::Instrument;
    let started = Instant::now();
    let method = req.method().as_str().to_owned();
    let request_id = request_id_of(&req);
    req.extensions_mut().insert(RequestId(request_id.clone()));
    let span = tracing::info_span!("request", request.id = %request_id, trace_id = tracing::field::Empty, http.method = %method, http.path = %req.path());
    // Continue the caller's trace (W3C `traceparent`/`tracestate`), so a
    // job's life starts in the client's trace when it sends one.
    telemetry::adopt_trace(&span, incoming_trace(&req).as_ref());
    let deadline = req.app_data::<RequestDeadline>().copied();
    let ops = req.app_data::<web::Data<Ops>>().cloned();
    let path_is_ops = is_ops_path(req.path());
    let call = next.call(req).instrument(span.clone());
    let response = match deadline {
        Some(RequestDeadline(limit)) => match tokio::time::timeout(limit, call).await {
            Ok(result) => result?.map_into_boxed_body(),
            Err(_) => {
                if let Some(ops) = &ops {
                    ops.http_metrics()
                        .requests
                        .with_label_values(&["timeout", method.as_str(), "503"])
                        .inc();
                }
                let problem = Problem::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "request-timeout",
                    "Request timed out",
                )
                .detail(format!(
                    "the server did not answer within {} s",
                    limit.as_secs()
                ));
                return Err(actix_web::error::InternalError::from_response(
                    "request timed out",
                    problem.response(),
                )
                .into());
            }
        },
        None => call.await?.map_into_boxed_body(),
    };
    let mut response = response;
    if let Ok(value) = actix_web::http::header::HeaderValue::from_str(&request_id) {
        response.headers_mut().insert(
            actix_web::http::header::HeaderName::from_static(REQUEST_ID_HEADER),
            value,
        );
    }
    // The access log line, inside the request span (request id, trace id).
    let status = response.status().as_u16();
    let elapsed_ms = started.elapsed().as_secs_f64() * 1000.0;
    span.in_scope(|| {
        if path_is_ops {
            tracing::debug!(http.status = status, elapsed_ms, "request served");
        } else {
            tracing::info!(http.status = status, elapsed_ms, "request served");
        }
    });
    if let Some(ops) = ops {
        let route = response
            .request()
            .match_pattern()
            .unwrap_or_else(|| "unmatched".to_owned());
        let metrics = ops.http_metrics();
        metrics
            .requests
            .with_label_values(&[route.as_str(), method.as_str(), response.status().as_str()])
            .inc();
        metrics
            .duration
            .with_label_values(&[route.as_str(), method.as_str()])
            .observe(started.elapsed().as_secs_f64());
    }
    Ok(response)
}

/// The routes every service serves: `configure`'s plus the operational
/// endpoints, behind the deadline and metrics middleware.
fn app<F>(
    ops: Ops,
    deadline: RequestDeadline,
    configure: F,
) -> App<
    impl actix_web::dev::ServiceFactory<
        ServiceRequest,
        Config = (),
        Response = ServiceResponse<impl MessageBody>,
        Error = actix_web::Error,
        InitError = (),
    >,
>
where
    F: Fn(&mut web::ServiceConfig) + 'static,
{
    App::new()
        .app_data(deadline)
        .wrap(from_fn(deadline_and_metrics))
        .configure(move |cfg| ops.configure(cfg))
        .configure(configure)
}

/// Stops `server` gracefully once `shutdown` is cancelled.
fn stop_on(shutdown: CancellationToken, server: actix_web::dev::ServerHandle) {
    tokio::spawn(async move {
        shutdown.cancelled().await;
        server.stop(true).await;
    });
}

/// Serves `configure`'s routes plus the operational endpoints until
/// `shutdown` is cancelled, then stops accepting and lets in-flight
/// requests finish (up to the shutdown timeout).
pub async fn serve<F>(
    listener: TcpListener,
    config: &HttpConfig,
    ops: Ops,
    shutdown: CancellationToken,
    configure: F,
) -> std::io::Result<()>
where
    F: Fn(&mut web::ServiceConfig) + Send + Clone + 'static,
{
    let deadline = RequestDeadline(config.request_timeout);
    let server = HttpServer::new(move || app(ops.clone(), deadline, configure.clone()))
        .workers(config.workers)
        // Responses and WebSocket frames go out at once, not after Nagle's wait.
        .tcp_nodelay(true)
        .keep_alive(config.keep_alive)
        .client_request_timeout(config.client_request_timeout)
        .shutdown_timeout(config.shutdown_timeout.as_secs())
        .disable_signals()
        .listen(listener)?
        .run();
    stop_on(shutdown, server.handle());
    server.await
}

/// A WebSocket upgrade request's connection, with the HTTP/1 codec that read
/// the request: its read buffer may already hold the client's first frames.
pub type UpgradeConnection = actix_codec::Framed<tokio::net::TcpStream, actix_http::h1::Codec>;

/// [`serve`], except that WebSocket upgrade requests (and `CONNECT`) skip the
/// routes and the middleware and go to `upgrade` with their bare connection.
/// `upgrade` answers the handshake itself and owns the socket from then on,
/// so a held WebSocket costs no HTTP buffers (actix-web keeps 16 KiB of them
/// per connection for as long as a request lasts).
pub async fn serve_with_upgrades<F, U, Handled>(
    listener: TcpListener,
    config: &HttpConfig,
    ops: Ops,
    shutdown: CancellationToken,
    configure: F,
    upgrade: U,
) -> std::io::Result<()>
where
    F: Fn(&mut web::ServiceConfig) + Send + Clone + 'static,
    U: Fn(actix_http::Request, UpgradeConnection) -> Handled + Send + Clone + 'static,
    Handled: Future<Output = ()> + 'static,
{
    use actix_service::{IntoServiceFactory, ServiceFactoryExt};
    let deadline = RequestDeadline(config.request_timeout);
    let local_addr = listener.local_addr()?;
    let http = config.clone();
    let server = actix_server::Server::build()
        .workers(config.workers)
        .shutdown_timeout(config.shutdown_timeout.as_secs())
        .disable_signals()
        .listen("http", listener, move || {
            let upgrade = upgrade.clone();
            let routes = app(ops.clone(), deadline, configure.clone())
                .into_factory()
                .map_err(|error: actix_web::Error| error.error_response());
            actix_http::HttpService::build()
                .keep_alive(http.keep_alive)
                .client_request_timeout(http.client_request_timeout)
                .tcp_nodelay(true)
                .local_addr(local_addr)
                .upgrade(actix_service::fn_service(
                    move |(request, connection): (actix_http::Request, UpgradeConnection)| {
                        let handled = upgrade(request, connection);
                        async move {
                            handled.await;
                            Ok::<_, std::convert::Infallible>(())
                        }
                    },
                ))
                // The default app config only names a host for requests
                // without a `Host` header; nothing here builds URLs from it.
                .finish(actix_service::map_config(routes, |()| {
                    actix_web::dev::AppConfig::default()
                }))
                .tcp()
        })?
        .run();
    stop_on(shutdown, server.handle());
    server.await
}
