//! One WebSocket connection: the handshake and its token, the message loop
//! (subscribe, unsubscribe, ping), keepalive, the bounded send queue, and a
//! task per subscription that sends history then live with no gap and no
//! duplicate.
//!
//! A job subscription joins the channel's feed first (so nothing published
//! from then on is missed), then reads PostgreSQL from `since_seq` in
//! pages, then merges the feed: lines already sent are dropped, a hole is
//! filled from PostgreSQL before anything after it is sent.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use actix_web::{HttpRequest, HttpResponse, web};
use actix_ws::{CloseCode, CloseReason, Message};
use auth::Principal;
use bytestring::ByteString;
use domain::JobId;
use domain::events::LogLine;
use serde::Deserialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::hub::{FeedItem, Hub, PAGE, Subscription};
use crate::protocol::{
    BEARER_PROTOCOL_PREFIX, ClientMessage, SUBPROTOCOL, ServerMessage, StatusView, Topic, close,
    error_code,
};

/// What every connection shares.
pub struct AppState {
    pub hub: Hub,
    pub metrics: crate::metrics::Metrics,
    pub verifier: auth::Verifier,
    pub settings: Settings,
    pub shutdown: CancellationToken,
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

#[derive(Deserialize)]
struct TokenQuery {
    access_token: Option<String>,
}

/// The bearer token: `Authorization` header, `?access_token=`, or a
/// `bearer.<jwt>` entry of `Sec-WebSocket-Protocol`.
fn token_of(req: &HttpRequest) -> Option<String> {
    if let Some(token) = req
        .headers()
        .get(actix_web::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(auth::bearer)
    {
        return Some(token.to_owned());
    }
    if let Ok(query) = web::Query::<TokenQuery>::from_query(req.query_string())
        && let Some(token) = query.into_inner().access_token.filter(|t| !t.is_empty())
    {
        return Some(token);
    }
    req.headers()
        .get_all(actix_web::http::header::SEC_WEBSOCKET_PROTOCOL)
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .find_map(|p| p.trim().strip_prefix(BEARER_PROTOCOL_PREFIX))
        .filter(|t| !t.is_empty())
        .map(str::to_owned)
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

/// `GET /v1/ws`: upgrades, then authenticates. A bad token still upgrades
/// so that browsers see the close code (4001) and its reason.
pub async fn connect(
    req: HttpRequest,
    body: web::Payload,
    state: web::Data<AppState>,
) -> actix_web::Result<HttpResponse> {
    let verdict = match token_of(&req) {
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
    let (response, session, stream) = actix_ws::handle_with_protocols(&req, body, &[SUBPROTOCOL])?;
    let state = state.into_inner();
    actix_web::rt::spawn(async move {
        match verdict {
            Ok((principal, expiry)) => {
                Connection::new(state, session, Arc::new(principal))
                    .run(stream, expiry)
                    .await;
            }
            Err((code, reason)) => {
                let _ = session.close(Some(reason_of(code, &reason))).await;
            }
        }
    });
    Ok(response)
}

fn reason_of(code: u16, description: &str) -> CloseReason {
    CloseReason {
        code: CloseCode::from(code),
        description: Some(description.to_owned()),
    }
}

struct Connection {
    state: Arc<AppState>,
    session: actix_ws::Session,
    principal: Arc<Principal>,
    out_tx: mpsc::Sender<ByteString>,
    out_rx: mpsc::Receiver<ByteString>,
    slow: CancellationToken,
    subscriptions: HashMap<String, tokio::task::JoinHandle<()>>,
}

enum Outcome {
    Continue,
    Close(u16, &'static str),
    Gone,
}

impl Connection {
    fn new(state: Arc<AppState>, session: actix_ws::Session, principal: Arc<Principal>) -> Self {
        let (out_tx, out_rx) = mpsc::channel(state.settings.send_queue_frames.max(1));
        Self {
            state,
            session,
            principal,
            out_tx,
            out_rx,
            slow: CancellationToken::new(),
            subscriptions: HashMap::new(),
        }
    }

    async fn run(
        mut self,
        mut stream: actix_ws::MessageStream,
        expiry: Option<tokio::time::Instant>,
    ) {
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
                _ = shutdown.cancelled() => Outcome::Close(close::GOING_AWAY, "server shutting down"),
                _ = &mut expired, if expiry.is_some() => Outcome::Close(close::UNAUTHORIZED, "token expired"),
                _ = slow.cancelled() => Outcome::Close(close::SLOW_CONSUMER, "send queue full: resubscribe with since_seq"),
                _ = ping.tick() => {
                    if awaiting_pong {
                        Outcome::Close(close::KEEPALIVE_TIMEOUT, "no pong")
                    } else {
                        awaiting_pong = true;
                        self.write_ping().await
                    }
                }
                frame = self.out_rx.recv() => match frame {
                    Some(frame) => self.write(frame).await,
                    None => Outcome::Gone,
                },
                message = stream.recv() => match message {
                    None => Outcome::Gone,
                    Some(Err(_)) => Outcome::Close(close::PROTOCOL_ERROR, "bad frame"),
                    Some(Ok(Message::Text(text))) => self.on_text(&text),
                    Some(Ok(Message::Ping(bytes))) => {
                        if self.session.pong(&bytes).await.is_err() { Outcome::Gone } else { Outcome::Continue }
                    }
                    Some(Ok(Message::Pong(_))) => { awaiting_pong = false; Outcome::Continue }
                    Some(Ok(Message::Close(_))) => Outcome::Close(1000, "bye"),
                    Some(Ok(Message::Binary(_) | Message::Continuation(_))) => {
                        Outcome::Close(close::UNSUPPORTED_DATA, "JSON text frames only")
                    }
                    Some(Ok(Message::Nop)) => Outcome::Continue,
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
        if let Outcome::Close(code, reason) = outcome {
            if code == close::SLOW_CONSUMER {
                self.state.metrics.slow_consumer_closes.inc();
                tracing::info!(
                    user.id = %self.principal.user_id,
                    "closing a slow consumer"
                );
            }
            let closing = self.session.close(Some(reason_of(code, reason)));
            // A consumer that reads nothing will not take the close frame
            // either: give up after a while and drop the connection.
            let _ = tokio::time::timeout(Duration::from_secs(10), closing).await;
        }
    }

    async fn write(&mut self, frame: ByteString) -> Outcome {
        let slow = self.slow.clone();
        tokio::select! {
            result = self.session.text(frame) => match result {
                Ok(()) => Outcome::Continue,
                Err(_) => Outcome::Gone,
            },
            _ = slow.cancelled() => Outcome::Close(close::SLOW_CONSUMER, "send queue full: resubscribe with since_seq"),
        }
    }

    async fn write_ping(&mut self) -> Outcome {
        match self.session.ping(b"").await {
            Ok(()) => Outcome::Continue,
            Err(_) => Outcome::Gone,
        }
    }

    fn reply(&mut self, message: ServerMessage<'_>) -> Outcome {
        match self.out_tx.try_send(message.frame()) {
            Ok(()) => Outcome::Continue,
            Err(_) => Outcome::Close(
                close::SLOW_CONSUMER,
                "send queue full: resubscribe with since_seq",
            ),
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
    out: mpsc::Sender<ByteString>,
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
    async fn send(&self, frame: ByteString) -> Result<(), Stop> {
        self.out.send(frame).await.map_err(|_| Stop::Quiet)
    }

    /// Never waits: live frames; a full queue makes the connection slow.
    fn push(&self, frame: ByteString) -> Result<(), Stop> {
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
