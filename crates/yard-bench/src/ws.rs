//! WebSocket clients, one code path for both servers compared: the
//! realtime-broadcaster (`/v1/ws`, JSON frames) and a socket.io server
//! (engine.io v4 over a plain WebSocket: `40` to join the namespace, `2`/`3`
//! ping/pong, `42[...]` events). Log lines carry their send time as
//! `t=<unix ns>` at the start of the text; a frame's latency is that of its
//! oldest (first) line.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context;
use futures_util::{SinkExt, StreamExt};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;

use crate::stats::now_ns;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Server {
    Switchyard,
    SocketIo,
}

/// What the subscribers of one run saw.
#[derive(Default)]
pub struct Sink {
    pub lines: AtomicU64,
    pub frames: AtomicU64,
    pub ready: AtomicU64,
    pub closed: AtomicU64,
    pub recording: AtomicBool,
    pub latencies: Mutex<Vec<u64>>,
}

impl Sink {
    pub fn take_latencies(&self) -> Vec<u64> {
        std::mem::take(&mut *self.latencies.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn on_log_frame(&self, text: &str) {
        let received = now_ns();
        let lines = text.matches("\"seq\":").count() as u64;
        self.lines.fetch_add(lines, Ordering::Relaxed);
        self.frames.fetch_add(1, Ordering::Relaxed);
        if self.recording.load(Ordering::Relaxed)
            && let Some(sent) = first_line_time(text)
        {
            self.latencies
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(received.saturating_sub(sent));
        }
    }
}

/// The `t=<ns>` stamp of the first line in a frame.
pub fn first_line_time(text: &str) -> Option<u64> {
    let at = text.find("\"line\":\"t=")? + "\"line\":\"t=".len();
    let digits: String = text[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// One log line's text: send time first, then an index and padding to a
/// typical CI log line length (about 80 bytes).
pub fn stamped_line(sent_ns: u64, i: u64) -> String {
    format!(
        "t={sent_ns} i={i} compiling crate bench-{:06} v0.1.0 (/src/bench)",
        i % 1_000_000
    )
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn dial(url: &str) -> anyhow::Result<Ws> {
    // tungstenite zero-fills its whole read buffer before every read (128 KiB
    // by default): at 100,000 frames/s that memset alone would cost the load
    // generator a quarter of a core, taken from the servers it measures.
    let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .read_buffer_size(16 * 1024);
    let (ws, _) = tokio::time::timeout(
        Duration::from_secs(20),
        tokio_tungstenite::connect_async_with_config(url, Some(config), false),
    )
    .await
    .context("WebSocket connect timed out")?
    .with_context(|| {
        format!(
            "WebSocket connect to {}",
            url.split('?').next().unwrap_or(url)
        )
    })?;
    Ok(ws)
}

/// URL of a connection: the broadcaster authenticates with `access_token`.
pub fn url_for(server: Server, base: &str, token: &str) -> String {
    match server {
        Server::Switchyard => format!("{base}?access_token={token}"),
        Server::SocketIo => format!(
            "{}/socket.io/?EIO=4&transport=websocket",
            base.trim_end_matches('/')
        ),
    }
}

/// A subscriber: connects, subscribes to `channel` (Switchyard) or joins
/// the default namespace (socket.io: the server puts every socket in the
/// room), counts `ready` once subscribed, then counts what arrives until
/// the task is aborted.
pub fn subscriber(
    server: Server,
    url: String,
    channel: Option<String>,
    sink: Arc<Sink>,
) -> JoinHandle<anyhow::Result<()>> {
    tokio::spawn(async move {
        let mut ws = dial(&url).await?;
        if let (Server::Switchyard, Some(channel)) = (server, &channel) {
            let subscribe = serde_json::json!({ "type": "subscribe", "channel": channel });
            ws.send(Message::text(subscribe.to_string())).await?;
        }
        while let Some(frame) = ws.next().await {
            let text = match frame? {
                Message::Text(t) => t,
                Message::Close(_) => break,
                _ => continue,
            };
            let text: &str = text.as_str();
            match server {
                Server::Switchyard => {
                    if text.starts_with("{\"type\":\"log\"") || text.contains("\"type\":\"log\"") {
                        sink.on_log_frame(text);
                    } else if text.contains("\"type\":\"subscribed\"") {
                        sink.ready.fetch_add(1, Ordering::Relaxed);
                    } else if text.contains("\"type\":\"error\"") {
                        eprintln!("yard-bench: broadcaster error frame: {text}");
                    }
                }
                Server::SocketIo => {
                    if text.starts_with("42") {
                        sink.on_log_frame(text);
                    } else if text.starts_with("40") {
                        sink.ready.fetch_add(1, Ordering::Relaxed);
                    } else if text.starts_with('0') {
                        ws.send(Message::text("40")).await?;
                    } else if text == "2" {
                        ws.send(Message::text("3")).await?;
                    }
                }
            }
        }
        sink.closed.fetch_add(1, Ordering::Relaxed);
        Ok(())
    })
}

/// Opens `count` idle connections (`parallel` handshakes at a time); each is
/// held by a task that only answers pings. Returns the tasks and how many
/// connected.
pub async fn idle_connections(
    server: Server,
    url: &str,
    count: usize,
    parallel: usize,
) -> (Vec<JoinHandle<()>>, usize, Option<String>) {
    let held = Arc::new(AtomicU64::new(0));
    let first_error = Arc::new(Mutex::new(None::<String>));
    let semaphore = Arc::new(tokio::sync::Semaphore::new(parallel));
    let mut tasks = Vec::with_capacity(count);
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::unbounded_channel::<bool>();
    for _ in 0..count {
        let url = url.to_owned();
        let semaphore = semaphore.clone();
        let held = held.clone();
        let first_error = first_error.clone();
        let ready_tx = ready_tx.clone();
        tasks.push(tokio::spawn(async move {
            let permit = semaphore.acquire_owned().await;
            let ws = dial(&url).await;
            drop(permit);
            let mut ws = match ws {
                Ok(ws) => ws,
                Err(e) => {
                    first_error
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .get_or_insert(format!("{e:#}"));
                    let _ = ready_tx.send(false);
                    return;
                }
            };
            held.fetch_add(1, Ordering::Relaxed);
            let _ = ready_tx.send(true);
            while let Some(Ok(frame)) = ws.next().await {
                if let (Server::SocketIo, Message::Text(t)) = (server, &frame) {
                    if t.as_str().starts_with('0') {
                        let _ = ws.send(Message::text("40")).await;
                    } else if t.as_str() == "2" {
                        let _ = ws.send(Message::text("3")).await;
                    }
                }
                if matches!(frame, Message::Close(_)) {
                    break;
                }
            }
            held.fetch_sub(1, Ordering::Relaxed);
        }));
    }
    drop(ready_tx);
    let mut done = 0;
    while done < count && ready_rx.recv().await.is_some() {
        done += 1;
    }
    let error = first_error
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    (tasks, held.load(Ordering::Relaxed) as usize, error)
}

/// Resident memory of a process, from /proc/<pid>/status (KiB).
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamp_of_the_first_line_is_found() {
        let frame = format!(
            r#"{{"type":"log","lines":[{{"seq":1,"line":"{}"}},{{"seq":2,"line":"{}"}}]}}"#,
            stamped_line(123, 1),
            stamped_line(456, 2)
        );
        assert_eq!(first_line_time(&frame), Some(123));
        assert_eq!(frame.matches("\"seq\":").count(), 2);
        assert_eq!(first_line_time("{\"type\":\"pong\"}"), None);
    }
}
