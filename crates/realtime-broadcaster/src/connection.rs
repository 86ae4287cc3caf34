//! One WebSocket connection: the handshake and its token, the message loop
//! (subscribe, unsubscribe, ping), keepalive, the bounded send queue, and a
//! task per subscription that sends history then live with no gap and no
//! duplicate.
//!
//! The HTTP server hands the upgrade request over with its bare socket
//! ([`service_kit::http::serve_with_upgrades`]); after the handshake the
//! connection lives on the service's runtime with a 1 KiB read buffer and
//! no HTTP state, which is what lets one replica hold tens of thousands.
//!
//! A job subscription joins the channel's feed first (so nothing published
//! from then on is missed), then reads PostgreSQL from `since_seq` in
//! pages, then merges the feed: lines already sent are dropped, a hole is
//! filled from PostgreSQL before anything after it is sent.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use actix_http::body::{BodySize, MessageBody};
use actix_http::h1;
use actix_http::header::{self, HeaderMap};
use actix_web::HttpResponse;
use actix_web::http::StatusCode;
use auth::Principal;
use domain::JobId;
use domain::events::LogLine;
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use service_kit::http::UpgradeConnection;
use service_kit::problem::Problem;
use tokio::sync::mpsc;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::hub::{FeedItem, Hub, PAGE, Subscription};
use crate::protocol::{
    BEARER_PROTOCOL_PREFIX, ClientMessage, Frame, MAX_CLIENT_MESSAGE_BYTES, SUBPROTOCOL,
    ServerMessage, StatusView, Topic, close, error_code,
};

/// The WebSocket route; every other upgrade request gets 404.
pub const PATH: &str = "/v1/ws";

/// What every connection shares.
pub struct AppState {
    pub hub: Hub,
    pub metrics: crate::metrics::Metrics,
    pub verifier: auth::Verifier,
    pub settings: Settings,
    pub shutdown: CancellationToken,
    /// Open connections, so shutdown can wait for their close frames.
    pub connections: TaskTracker,
}

/// Connection limits and timing.
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    /// Server ping interval; a connection that has not answered the
    /// previous ping by the next one is closed.
    pub ping_interval: Duration,
    /// Frames queued for one connection before it counts as slow.
    pub send_queue_frames: usize,
    /// Items a subscription may have waiting from its feed.
    pub feed_queue_items: usize,
    /// Subscriptions one connection may hold at once.
    pub max_subscriptions: usize,
}

type Socket = WebSocketStream<tokio::net::TcpStream>;

/// Buffers sized for a connection that mostly waits: client messages are
/// small (the read buffer grows for a larger one, up to the limit), and
/// queued frames go out in one write of up to 64 KiB.
fn socket_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(1024)
        .write_buffer_size(64 * 1024)
        .max_message_size(Some(MAX_CLIENT_MESSAGE_BYTES))
        .max_frame_size(Some(MAX_CLIENT_MESSAGE_BYTES))
}

#[derive(Deserialize)]
struct TokenQuery {
    access_token: Option<String>,
}

/// The bearer token: `Authorization` header, `?access_token=`, or a
/// `bearer.<jwt>` entry of `Sec-WebSocket-Protocol`.
fn token_of(headers: &HeaderMap, query: &str) -> Option<String> {
    if let Some(token) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(auth::bearer)
    {
        return Some(token.to_owned());
    }
    if let Ok(query) = actix_web::web::Query::<TokenQuery>::from_query(query)
        && let Some(token) = query.into_inner().access_token.filter(|t| !t.is_empty())
    {
        return Some(token);
    }
    offered_protocols(headers)
        .find_map(|p| p.strip_prefix(BEARER_PROTOCOL_PREFIX))
        .filter(|t| !t.is_empty())
        .map(str::to_owned)
}

fn offered_protocols(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
}

/// When a verified token stops being accepted (`exp` plus the verifier's
/// leeway); the connection is closed with 4001 then.
fn expiry_of(token: &str) -> Option<tokio::time::Instant> {
    use base64::Engine;
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    let exp = claims.get("exp")?.as_u64()?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?
        .as_secs();
    let left = exp
        .saturating_add(auth::verifier::LEEWAY_SECS)
        .saturating_sub(now);
    Some(tokio::time::Instant::now() + Duration::from_secs(left))
}

/// `GET /v1/ws` without `Upgrade: websocket` (upgrade requests never reach
/// the routes): 426.
pub async fn upgrade_required() -> HttpResponse {
    let mut response = Problem::new(
        StatusCode::UPGRADE_REQUIRED,
        "upgrade-required",
        "WebSocket upgrade required",
    )
    .detail(format!("{PATH} speaks WebSocket only (PROTOCOL.md)"))
    .response();
    response.headers_mut().insert(
        header::UPGRADE,
        header::HeaderValue::from_static("websocket"),
    );
    response
}

/// Writes an HTTP response to an upgrade request it refuses, and ends.
async fn refuse(
    mut connection: UpgradeConnection,
    response: actix_http::Response<actix_http::body::BoxBody>,
) {
    let (mut head, body) = response.into_parts();
    // Nothing follows on this connection (the request was an upgrade).
    head.head_mut()
        .set_connection_type(actix_http::ConnectionType::Close);
    let body = body.try_into_bytes().unwrap_or_default();
    let sent = async {
        connection
            .send(h1::Message::Item((
                head,
                BodySize::Sized(body.len() as u64),
            )))
            .await?;
        connection.send(h1::Message::Chunk(Some(body))).await?;
        connection.send(h1::Message::Chunk(None)).await
    };
    if let Err(error) = sent.await {
        tracing::debug!(error = %error, "refusing an upgrade request");
    }
}

/// A WebSocket upgrade request (`GET /v1/ws`): completes the handshake,
/// then authenticates. A bad token still upgrades so that browsers see the
/// close code (4001) and its reason.
pub async fn upgrade(
    state: Arc<AppState>,
    request: actix_http::Request,
    mut connection: UpgradeConnection,
) {
    if request.path() != PATH {
        let problem = Problem::new(StatusCode::NOT_FOUND, "not-found", "No WebSocket here")
            .detail(format!("WebSocket connections go to {PATH}"));
        return refuse(connection, problem.response().into()).await;
    }
    let mut handshake = match actix_http::ws::handshake(request.head()) {
        Ok(handshake) => handshake,
        Err(error) => {
            let status = actix_http::Response::from(&error).status();
            let problem = Problem::new(status, "bad-handshake", "Not a WebSocket handshake")
                .detail(error.to_string());
            return refuse(connection, problem.response().into()).await;
        }
    };
    let headers = &request.head().headers;
    let verdict = match token_of(headers, request.uri().query().unwrap_or("")) {
        None => Err((close::UNAUTHORIZED, "missing bearer token".to_owned())),
        Some(token) => match state.verifier.verify(&token).await {
            Ok(principal) => Ok((principal, expiry_of(&token))),
            Err(error) if error.is_server_side() => {
                tracing::error!(error = %error, "token verification keys unavailable");
                Err((
                    close::TRY_AGAIN_LATER,
                    "verification unavailable".to_owned(),
                ))
            }
            Err(error) => Err((close::UNAUTHORIZED, error.to_string())),
        },
    };
    // Browsers fail the handshake if they offer protocols and none is chosen.
    if offered_protocols(headers).any(|p| p == SUBPROTOCOL) {
        handshake.insert_header((header::SEC_WEBSOCKET_PROTOCOL, SUBPROTOCOL));
    }
    let (head, _) = handshake.finish().into_parts();
    if let Err(error) = connection
        .send(h1::Message::Item((head, BodySize::None)))
        .await
    {
        tracing::debug!(error = %error, "WebSocket handshake not sent");
        return;
    }
    let parts = connection.into_parts();
    // Frames the client sent right behind its request.
    let early = parts.read_buf.to_vec();
    // Off the HTTP worker's reactor, onto the service's runtime.
    let socket = match parts.io.into_std() {
        Ok(socket) => socket,
        Err(error) => {
            tracing::debug!(error = %error, "upgraded socket lost");
            return;
        }
    };
    let runtime = state.hub.runtime().clone();
    let connections = state.connections.clone();
    connections.spawn_on(
        async move {
            let socket = match tokio::net::TcpStream::from_std(socket) {
                Ok(socket) => socket,
                Err(error) => {
                    tracing::warn!(error = %error, "cannot register an upgraded socket");
                    return;
                }
            };
            let socket = WebSocketStream::from_partially_read(
                socket,
                early,
                Role::Server,
                Some(socket_config()),
            )
            .await;
            match verdict {
                Ok((principal, expiry)) => {
                    Connection::new(state, Arc::new(principal))
                        .run(socket, expiry)
                        .await;
                }
                Err((code, reason)) => close_socket(socket, code, &reason, Vec::new()).await,
            }
        },
        &runtime,
    );
}

/// How long a closing connection may take to accept what was queued and
/// the close frame. A slow consumer usually catches up and reads them.
const CLOSE_WITHIN: Duration = Duration::from_secs(60);

/// Sends what is still queued and the close frame, then reads until the
/// client's close, so that unread input does not reset the connection
/// before the client has read ours (all within [`CLOSE_WITHIN`]).
async fn close_socket(mut socket: Socket, code: u16, reason: &str, queued: Vec<Frame>) {
    let frame = CloseFrame {
        code: CloseCode::from(code),
        reason: reason.into(),
    };
    let closing = async {
        for queued in queued {
            socket.feed(Message::Text(queued)).await?;
        }
        socket.close(Some(frame)).await?;
        while let Some(Ok(_)) = socket.next().await {}
        Ok::<_, tungstenite::Error>(())
    };
    // A consumer that reads nothing will not take the close frame either:
    // give up after a while and drop the connection.
    let _ = tokio::time::timeout(CLOSE_WITHIN, closing).await;
}

struct Connection {
    state: Arc<AppState>,
    principal: Arc<Principal>,
    out_tx: mpsc::Sender<Frame>,
    out_rx: mpsc::Receiver<Frame>,
    slow: CancellationToken,
    /// A frame taken from the queue by a write that gave up.
    unsent: Option<Frame>,
    subscriptions: HashMap<String, tokio::task::JoinHandle<()>>,
}

const SLOW: &str = "send queue full: resubscribe with since_seq";
const SHUTTING_DOWN: &str = "server shutting down";

enum Outcome {
    Continue,
    Close(u16, &'static str),
    /// The client closed; its close frame is answered.
    ClosedByClient,
    Gone,
}

impl Connection {
    fn new(state: Arc<AppState>, principal: Arc<Principal>) -> Self {
        let (out_tx, out_rx) = mpsc::channel(state.settings.send_queue_frames.max(1));
        Self {
            state,
            principal,
            out_tx,
            out_rx,
            slow: CancellationToken::new(),
            unsent: None,
            subscriptions: HashMap::new(),
        }
    }

    async fn run(mut self, mut socket: Socket, expiry: Option<tokio::time::Instant>) {
        let interval = self.state.settings.ping_interval;
        let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        let mut awaiting_pong = false;
        let shutdown = self.state.shutdown.clone();
        let slow = self.slow.clone();
        let _open = crate::metrics::Held::new(&self.state.metrics.websocket_connections);
        let far = tokio::time::Instant::now() + Duration::from_secs(86_400 * 365);
        let expired = tokio::time::sleep_until(expiry.unwrap_or(far));
        tokio::pin!(expired);
        let outcome = loop {
            let outcome = tokio::select! {
                _ = shutdown.cancelled() => Outcome::Close(close::GOING_AWAY, SHUTTING_DOWN),
                _ = &mut expired, if expiry.is_some() => Outcome::Close(close::UNAUTHORIZED, "token expired"),
                _ = slow.cancelled() => Outcome::Close(close::SLOW_CONSUMER, SLOW),
                _ = ping.tick() => {
                    if awaiting_pong {
                        Outcome::Close(close::KEEPALIVE_TIMEOUT, "no pong")
                    } else {
                        awaiting_pong = true;
                        self.write(&mut socket, Message::Ping(Default::default())).await
                    }
                }
                frame = self.out_rx.recv() => match frame {
                    Some(frame) => self.write(&mut socket, Message::Text(frame)).await,
                    None => Outcome::Gone,
                },
                message = socket.next() => match message {
                    None => Outcome::Gone,
                    Some(Err(tungstenite::Error::Capacity(_))) => {
                        Outcome::Close(close::MESSAGE_TOO_BIG, "client messages are at most 64 KiB")
                    }
                    Some(Err(tungstenite::Error::Protocol(_) | tungstenite::Error::Utf8(_))) => {
                        Outcome::Close(close::PROTOCOL_ERROR, "bad frame")
                    }
                    Some(Err(_)) => Outcome::Gone,
                    Some(Ok(Message::Text(text))) => self.on_text(&text),
                    // Answered by the socket on its next read.
                    Some(Ok(Message::Ping(_) | Message::Frame(_))) => Outcome::Continue,
                    Some(Ok(Message::Pong(_))) => { awaiting_pong = false; Outcome::Continue }
                    Some(Ok(Message::Close(_))) => Outcome::ClosedByClient,
                    Some(Ok(Message::Binary(_))) => {
                        Outcome::Close(close::UNSUPPORTED_DATA, "JSON text frames only")
                    }
                },
            };
            match outcome {
                Outcome::Continue => {}
                other => break other,
            }
        };
        for (_, task) in self.subscriptions.drain() {
            task.abort();
        }
        match outcome {
            Outcome::Close(code, reason) => {
                if code == close::SLOW_CONSUMER {
                    self.state.metrics.slow_consumer_closes.inc();
                    tracing::info!(
                        user.id = %self.principal.user_id,
                        "closing a slow consumer"
                    );
                }
                // What was queued before the close still goes first.
                let mut queued: Vec<Frame> = self.unsent.take().into_iter().collect();
                while let Ok(frame) = self.out_rx.try_recv() {
                    queued.push(frame);
                }
                close_socket(socket, code, reason, queued).await;
            }
            Outcome::ClosedByClient => {
                let _ = tokio::time::timeout(CLOSE_WITHIN, socket.flush()).await;
            }
            Outcome::Continue | Outcome::Gone => {}
        }
    }

    /// Sends `first` and whatever else is queued by then in one write. Gives
    /// up on a client that takes no bytes for a ping interval, or once the
    /// connection is slow or the server stops; a frame taken from the queue
    /// but not yet handed to the socket is kept for the close.
    async fn write(&mut self, socket: &mut Socket, first: Message) -> Outcome {
        let mut pending = Some(first);
        let out_rx = &mut self.out_rx;
        let sent = async {
            loop {
                std::future::poll_fn(|cx| socket.poll_ready_unpin(cx)).await?;
                let Some(message) = pending
                    .take()
                    .or_else(|| out_rx.try_recv().ok().map(Message::Text))
                else {
                    break;
                };
                socket.start_send_unpin(message)?;
            }
            socket.flush().await
        };
        let outcome = tokio::select! {
            result = sent => match result {
                Ok(()) => Outcome::Continue,
                Err(_) => Outcome::Gone,
            },
            _ = self.slow.cancelled() => Outcome::Close(close::SLOW_CONSUMER, SLOW),
            _ = tokio::time::sleep(self.state.settings.ping_interval) => {
                Outcome::Close(close::SLOW_CONSUMER, "not reading")
            }
            _ = self.state.shutdown.cancelled() => Outcome::Close(close::GOING_AWAY, SHUTTING_DOWN),
        };
        if let Some(Message::Text(frame)) = pending {
            self.unsent = Some(frame);
        }
        outcome
    }

    fn reply(&mut self, message: ServerMessage<'_>) -> Outcome {
        match self.out_tx.try_send(message.frame()) {
            Ok(()) => Outcome::Continue,
            Err(_) => Outcome::Close(close::SLOW_CONSUMER, SLOW),
        }
    }

    fn on_text(&mut self, text: &str) -> Outcome {
        let value: serde_json::Value = match serde_json::from_str(text) {
            Ok(value) => value,
            Err(_) => return Outcome::Close(close::PROTOCOL_ERROR, "frames must be JSON"),
        };
        let message: ClientMessage = match serde_json::from_value(value) {
            Ok(message) => message,
            Err(error) => {
                let message = format!("not a client message: {error}");
                return self.reply(ServerMessage::Error {
                    code: error_code::BAD_REQUEST,
                    message: &message,
                    channel: None,
                });
            }
        };
        match message {
            ClientMessage::Ping { id } => self.reply(ServerMessage::Pong { id }),
            ClientMessage::Unsubscribe { channel } => {
                if let Some(task) = self.subscriptions.remove(&channel) {
                    task.abort();
                }
                Outcome::Continue
            }
            ClientMessage::Subscribe { channel, since_seq } => {
                let Some(topic) = Topic::parse(&channel) else {
                    return self.reply(ServerMessage::Error {
                        code: error_code::BAD_REQUEST,
                        message: "channel must be job:<uuid> or org:<id>",
                        channel: Some(&channel),
                    });
                };
                if since_seq.is_some_and(|s| s < 0) {
                    return self.reply(ServerMessage::Error {
                        code: error_code::BAD_REQUEST,
                        message: "since_seq must be 0 or more",
                        channel: Some(&channel),
                    });
                }
                // A repeated subscribe replaces the previous one (a client
                // recovering with a new since_seq).
                if let Some(task) = self.subscriptions.remove(&channel) {
                    task.abort();
                }
                self.subscriptions.retain(|_, task| !task.is_finished());
                if self.subscriptions.len() >= self.state.settings.max_subscriptions {
                    return self.reply(ServerMessage::Error {
                        code: error_code::BAD_REQUEST,
                        message: "too many subscriptions on this connection",
                        channel: Some(&channel),
                    });
                }
                let sub = SubscriptionTask {
                    hub: self.state.hub.clone(),
                    principal: self.principal.clone(),
                    out: self.out_tx.clone(),
                    slow: self.slow.clone(),
                    channel: channel.clone(),
                    feed_queue: self.state.settings.feed_queue_items,
                };
                let task = self.state.hub.spawn(sub.run(topic, since_seq.unwrap_or(0)));
                self.subscriptions.insert(channel, task);
                Outcome::Continue
            }
        }
    }
}

/// Why a subscription stopped early.
enum Stop {
    /// The connection is gone or slow; nothing more to say.
    Quiet,
    /// Tell the client, then stop.
    Error(&'static str, String),
}

struct SubscriptionTask {
    hub: Hub,
    principal: Arc<Principal>,
    out: mpsc::Sender<Frame>,
    slow: CancellationToken,
    channel: String,
    feed_queue: usize,
}

impl SubscriptionTask {
    async fn run(self, topic: Topic, since_seq: i64) {
        let result = match &topic {
            Topic::Job(job) => self.job(*job, since_seq).await,
            Topic::Org(org) => self.org(org).await,
        };
        if let Err(Stop::Error(code, message)) = result {
            let frame = ServerMessage::Error {
                code,
                message: &message,
                channel: Some(&self.channel),
            }
            .frame();
            let _ = self.out.send(frame).await;
        }
    }

    /// Waits for room: history and replies, paced by the client.
    async fn send(&self, frame: Frame) -> Result<(), Stop> {
        self.out.send(frame).await.map_err(|_| Stop::Quiet)
    }

    /// Never waits: live frames; a full queue makes the connection slow.
    fn push(&self, frame: Frame) -> Result<(), Stop> {
        match self.out.try_send(frame) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.slow.cancel();
                Err(Stop::Quiet)
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Err(Stop::Quiet),
        }
    }

    fn not_found(&self) -> Stop {
        Stop::Error(
            error_code::NOT_FOUND,
            format!(
                "{} does not exist or is not in your organizations",
                self.channel
            ),
        )
    }

    fn unavailable(error: impl std::fmt::Display) -> Stop {
        tracing::warn!(error = %error, "subscription failed");
        Stop::Error(
            error_code::UNAVAILABLE,
            "storage unavailable; retry".to_owned(),
        )
    }

    async fn subscribe(&self, topic: &Topic) -> Result<Subscription, Stop> {
        self.hub
            .subscribe(topic, self.feed_queue, self.slow.clone())
            .await
            .map_err(Self::unavailable)
    }

    async fn job_row(&self, job: JobId) -> Result<db::jobs::Job, Stop> {
        let mut conn = self.hub.db().conn().await.map_err(Self::unavailable)?;
        match db::jobs::get_any(&mut conn, job).await {
            Ok(row) => Ok(row),
            Err(db::DbError::NotFound) => Err(self.not_found()),
            Err(error) => Err(Self::unavailable(error)),
        }
    }

    async fn job(&self, job: JobId, since_seq: i64) -> Result<(), Stop> {
        let row = self.job_row(job).await?;
        let org = domain::OrgId::parse(row.org_id.clone()).map_err(Self::unavailable)?;
        if self.principal.membership(&org).is_none() {
            return Err(self.not_found());
        }
        // Live first, then history: nothing falls between the two.
        let mut live = self.subscribe(&Topic::Job(job)).await?;
        self.send(
            ServerMessage::Subscribed {
                channel: &self.channel,
                since_seq: Some(since_seq),
            }
            .frame(),
        )
        .await?;
        let row = self.job_row(job).await?;
        let status = StatusView::from_row(self.channel.clone(), &row);
        let mut next = since_seq + 1;
        if status.terminal {
            // Finished: every line is stored; send them, then the end.
            self.history(job, &mut next, i64::MAX).await?;
            return self.send(ServerMessage::Status(status).frame()).await;
        }
        self.send(ServerMessage::Status(status).frame()).await?;
        let mut pending = VecDeque::new();
        self.catch_up(job, &mut next, &mut live.items, &mut pending)
            .await?;
        loop {
            let item = match pending.pop_front() {
                Some(item) => item,
                None => match live.items.recv().await {
                    Some(item) => item,
                    None => break,
                },
            };
            match &*item {
                FeedItem::Log {
                    first,
                    last,
                    lines,
                    frame,
                } => {
                    if *last < next {
                        continue;
                    }
                    if *first > next {
                        self.history(job, &mut next, first - 1).await?;
                    }
                    if *first == next {
                        self.push(frame.clone())?;
                    } else {
                        let rest: Vec<LogLine> =
                            lines.iter().filter(|l| l.seq >= next).cloned().collect();
                        self.push(
                            ServerMessage::Log {
                                channel: &self.channel,
                                job_id: job,
                                lines: &rest,
                            }
                            .frame(),
                        )?;
                    }
                    next = last + 1;
                }
                FeedItem::Status { terminal, frame } => {
                    if *terminal {
                        self.history(job, &mut next, i64::MAX).await?;
                        return self.send(frame.clone()).await;
                    }
                    self.push(frame.clone())?;
                }
            }
        }
        Ok(())
    }

    /// Sends the history page by page until a short page (the head). Live
    /// items arriving meanwhile are moved to `pending` and those the
    /// history already covers dropped, so a long replay to a fast client
    /// never overflows the feed's queue.
    async fn catch_up(
        &self,
        job: JobId,
        next: &mut i64,
        items: &mut mpsc::Receiver<crate::hub::Item>,
        pending: &mut VecDeque<crate::hub::Item>,
    ) -> Result<(), Stop> {
        let page = i64::from(PAGE);
        loop {
            let start = *next;
            self.history(job, next, start + page - 1).await?;
            while let Ok(item) = items.try_recv() {
                pending.push_back(item);
            }
            let covered = *next;
            pending
                .retain(|item| !matches!(&**item, FeedItem::Log { last, .. } if *last < covered));
            if *next < start + page {
                return Ok(());
            }
        }
    }

    /// Sends stored lines from `next` up to `upto` in pages; advances `next`.
    async fn history(&self, job: JobId, next: &mut i64, upto: i64) -> Result<(), Stop> {
        while *next <= upto {
            let page = {
                let mut conn = self.hub.db().conn().await.map_err(Self::unavailable)?;
                db::logs::read(&mut conn, job, *next - 1, PAGE)
                    .await
                    .map_err(Self::unavailable)?
            };
            let full = page.len() as u32 == PAGE;
            let lines: Vec<LogLine> = page.into_iter().filter(|l| l.seq <= upto).collect();
            let Some(last) = lines.last().map(|l| l.seq) else {
                return Ok(());
            };
            self.send(
                ServerMessage::Log {
                    channel: &self.channel,
                    job_id: job,
                    lines: &lines,
                }
                .frame(),
            )
            .await?;
            *next = last + 1;
            if !full {
                return Ok(());
            }
        }
        Ok(())
    }

    async fn org(&self, org: &domain::OrgId) -> Result<(), Stop> {
        if self.principal.membership(org).is_none() {
            return Err(self.not_found());
        }
        let mut live = self.subscribe(&Topic::Org(org.clone())).await?;
        self.send(
            ServerMessage::Subscribed {
                channel: &self.channel,
                since_seq: None,
            }
            .frame(),
        )
        .await?;
        while let Some(item) = live.items.recv().await {
            match &*item {
                FeedItem::Status { frame, .. } | FeedItem::Log { frame, .. } => {
                    self.push(frame.clone())?;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_lasts_until_the_token_expires_plus_leeway() {
        let org = domain::OrgId::parse("acme").expect("org");
        let token = auth::dev::mint_hs256(
            "s",
            None,
            "u",
            &[(org, auth::Role::Member)],
            Duration::from_secs(3_600),
        );
        let left = expiry_of(&token).expect("exp") - tokio::time::Instant::now();
        let expected = 3_600 + auth::verifier::LEEWAY_SECS;
        assert!(left.as_secs() <= expected && left.as_secs() >= expected - 5);
        assert!(expiry_of("not.a-token").is_none());
    }
}
