//! A WebSocket client following one job's channel the way PROTOCOL.md says
//! a client should: subscribe with `since_seq` = the last seq it saw, and
//! after any disconnect (its broadcaster killed, PostgreSQL restarting)
//! reconnect to a replica and resubscribe from there. It records every
//! line and status it is sent, and flags any line whose seq is not exactly
//! the previous one plus one (a duplicate or a gap).

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use uuid::Uuid;

#[derive(Clone, Debug, PartialEq)]
pub struct SeenLine {
    pub seq: i64,
    pub stream: String,
    pub line: String,
}

#[derive(Debug, Default)]
pub struct Watched {
    pub job: Uuid,
    pub lines: Vec<SeenLine>,
    pub statuses: Vec<String>,
    /// The terminal status that ended the subscription, if one came.
    pub terminal: Option<String>,
    pub connections: u32,
    /// Out-of-order, repeated or missing lines, and protocol surprises.
    pub violations: Vec<String>,
}

impl Watched {
    fn last_seq(&self) -> i64 {
        self.lines.last().map_or(0, |l| l.seq)
    }
}

/// Follows `job` until a terminal status or `deadline`, starting on
/// broadcaster `first` and moving to the next one after each disconnect.
pub async fn watch(
    job: Uuid,
    broadcasters: Vec<String>,
    first: usize,
    token: String,
    deadline: Instant,
) -> Watched {
    let mut watched = Watched {
        job,
        ..Watched::default()
    };
    let mut index = first;
    while watched.terminal.is_none() && Instant::now() < deadline {
        let base = &broadcasters[index % broadcasters.len()];
        index += 1;
        let remaining = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(remaining, session(base, &token, &mut watched)).await {
            Ok(Ok(())) | Err(_) => {}
            Ok(Err(_disconnected)) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    watched
}

/// One connection; returns Ok once the terminal status came, Err when the
/// connection ended before.
async fn session(base: &str, token: &str, watched: &mut Watched) -> anyhow::Result<()> {
    let url = format!("{base}/v1/ws?access_token={token}");
    let (mut socket, _) = tokio_tungstenite::connect_async(url.as_str()).await?;
    watched.connections += 1;
    let channel = format!("job:{}", watched.job);
    let subscribe =
        json!({ "type": "subscribe", "channel": channel, "since_seq": watched.last_seq() });
    socket.send(Message::text(subscribe.to_string())).await?;
    while let Some(frame) = socket.next().await {
        let text = match frame? {
            Message::Text(text) => text,
            Message::Close(reason) => anyhow::bail!("closed: {reason:?}"),
            _ => continue,
        };
        let message: Value = serde_json::from_str(text.as_str())?;
        match message["type"].as_str().unwrap_or_default() {
            "log" => {
                for line in message["lines"].as_array().into_iter().flatten() {
                    let seq = line["seq"].as_i64().unwrap_or(-1);
                    let expected = watched.last_seq() + 1;
                    if seq != expected {
                        watched.violations.push(format!(
                            "job {}: got seq {seq} where {expected} was due",
                            watched.job
                        ));
                    }
                    watched.lines.push(SeenLine {
                        seq,
                        stream: line["stream"].as_str().unwrap_or_default().to_owned(),
                        line: line["line"].as_str().unwrap_or_default().to_owned(),
                    });
                }
            }
            "status" => {
                let status = message["status"].as_str().unwrap_or_default().to_owned();
                watched.statuses.push(status.clone());
                if message["terminal"].as_bool() == Some(true) {
                    watched.terminal = Some(status);
                    let _ = socket.close(None).await;
                    return Ok(());
                }
            }
            "error" => {
                let code = message["code"].as_str().unwrap_or_default();
                if code == "unavailable" {
                    // Storage did not answer (PostgreSQL restarting): retry.
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    let again = json!({ "type": "subscribe", "channel": channel, "since_seq": watched.last_seq() });
                    socket.send(Message::text(again.to_string())).await?;
                } else {
                    watched
                        .violations
                        .push(format!("job {}: error frame {message}", watched.job));
                    anyhow::bail!("error frame");
                }
            }
            _ => {}
        }
    }
    anyhow::bail!("connection ended")
}
