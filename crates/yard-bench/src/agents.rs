//! Simulated agents speaking the real gRPC protocol: each registers with a
//! registration token, opens one session (its own HTTP/2 connection), and
//! either completes every assignment at once (ack and success result sent
//! back to back, no process run) or hands it to the scenario to hold (the
//! log scenarios stream output through it).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context;
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
use yard_proto::v1 as pb;
use yard_proto::v1::agent_gateway_client::AgentGatewayClient;
use yard_proto::v1::agent_message::Msg as AgentMsg;
use yard_proto::v1::server_message::Msg as ServerMsg;

use crate::stats::now_ns;

/// What an agent does with an assignment.
#[derive(Clone)]
pub enum Mode {
    /// Acknowledge and report success immediately.
    Complete,
    /// Acknowledge, then let the scenario drive the job through [`Held`].
    Hold(mpsc::UnboundedSender<HeldEvent>),
}

/// Events about held jobs, for the scenario driving them.
pub enum HeldEvent {
    Assigned {
        job_id: String,
        epoch: u64,
        outbound: mpsc::Sender<pb::AgentMessage>,
    },
    LogAck {
        committed: u64,
    },
    ResultAck,
}

/// Counters and latency samples shared by a scenario's agents.
#[derive(Default)]
pub struct Recorder {
    pub assigned: AtomicU64,
    pub completed: AtomicU64,
    pub stale: AtomicU64,
    pub errors: AtomicU64,
    /// created → assignment received, ns (jobs stamped with `bench_t`).
    pub to_assigned: Mutex<Vec<u64>>,
    /// created → result acknowledged, ns.
    pub to_completed: Mutex<Vec<u64>>,
    /// Signalled on every completion.
    pub progress: Notify,
}

impl Recorder {
    pub fn take_samples(&self) -> (Vec<u64>, Vec<u64>) {
        let a = std::mem::take(&mut *self.to_assigned.lock().unwrap_or_else(|e| e.into_inner()));
        let c = std::mem::take(&mut *self.to_completed.lock().unwrap_or_else(|e| e.into_inner()));
        (a, c)
    }

    /// Waits until `target` completions or `timeout`; returns the count reached.
    pub async fn wait_completed(&self, target: u64, timeout: Duration) -> u64 {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.progress.notified();
            let done = self.completed.load(Ordering::Relaxed);
            if done >= target {
                return done;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.completed.load(Ordering::Relaxed);
            }
        }
    }
}

pub async fn connect(url: &str) -> anyhow::Result<Channel> {
    Endpoint::from_shared(url.to_owned())?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .connect()
        .await
        .with_context(|| format!("cannot reach the gateway at {url}"))
}

/// A registered agent's credential.
pub struct Registered {
    pub secret: String,
}

pub async fn register(
    grpc: &str,
    token: &str,
    name: &str,
    label: &str,
    capacity: u32,
) -> anyhow::Result<Registered> {
    let mut client = AgentGatewayClient::new(connect(grpc).await?);
    let response = client
        .register(pb::RegisterRequest {
            registration_token: token.to_owned(),
            name: name.to_owned(),
            labels: vec![label.to_owned()],
            capacity,
            version: "yard-bench".to_owned(),
        })
        .await
        .map_err(|s| anyhow::anyhow!("registration failed: {}", s.message()))?
        .into_inner();
    Ok(Registered {
        secret: response.agent_secret,
    })
}

/// A running session; dropping it (or `close`) hangs up.
pub struct Session {
    task: JoinHandle<()>,
}

impl Drop for Session {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn message(m: AgentMsg) -> pb::AgentMessage {
    pb::AgentMessage { msg: Some(m) }
}

/// Opens a session and returns once the gateway has welcomed the agent.
pub async fn open_session(
    grpc: &str,
    agent: &Registered,
    label: &str,
    capacity: u32,
    mode: Mode,
    recorder: Arc<Recorder>,
) -> anyhow::Result<Session> {
    let mut client = AgentGatewayClient::new(connect(grpc).await?)
        .max_decoding_message_size(16 * 1024 * 1024)
        .max_encoding_message_size(16 * 1024 * 1024);
    let (tx, rx) = mpsc::channel::<pb::AgentMessage>(8192);
    tx.send(message(AgentMsg::Hello(pb::Hello {
        labels: vec![label.to_owned()],
        capacity,
        version: "yard-bench".to_owned(),
        running: vec![],
    })))
    .await?;
    let mut request = tonic::Request::new(ReceiverStream::new(rx));
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {}", agent.secret).parse()?);
    let mut inbound = client
        .open_session(request)
        .await
        .map_err(|s| anyhow::anyhow!("open_session: {}", s.message()))?
        .into_inner();
    let heartbeat_every = match inbound.message().await {
        Ok(Some(pb::ServerMessage {
            msg: Some(ServerMsg::Welcome(w)),
        })) => Duration::from_millis(w.heartbeat_interval_ms.max(100)),
        other => anyhow::bail!("no welcome from the gateway: {other:?}"),
    };
    let task = tokio::spawn(async move {
        // Jobs acknowledged and not yet finished, for heartbeats.
        let mut running: HashMap<String, (u64, Option<u64>)> = HashMap::new();
        let mut heartbeat = tokio::time::interval(heartbeat_every);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                m = inbound.message() => {
                    let Ok(Some(pb::ServerMessage { msg: Some(m) })) = m else { return };
                    match m {
                        ServerMsg::Assignment(a) => {
                            let received = now_ns();
                            recorder.assigned.fetch_add(1, Ordering::Relaxed);
                            let created = a.spec.as_ref().and_then(|s| {
                                serde_json::from_str::<serde_json::Value>(&s.metadata_json).ok()
                            }).and_then(|m| m["bench_t"].as_u64());
                            if let Some(created) = created {
                                recorder.to_assigned.lock().unwrap_or_else(|e| e.into_inner())
                                    .push(received.saturating_sub(created));
                            }
                            running.insert(a.job_id.clone(), (a.epoch, created));
                            let ack = message(AgentMsg::AssignmentAck(pb::AssignmentAck {
                                job_id: a.job_id.clone(), epoch: a.epoch, trace: None,
                            }));
                            if tx.send(ack).await.is_err() { return }
                            match &mode {
                                Mode::Complete => {
                                    let result = message(AgentMsg::Result(pb::JobResult {
                                        job_id: a.job_id, epoch: a.epoch,
                                        outcome: pb::Outcome::Succeeded as i32,
                                        exit_code: Some(0), error_kind: String::new(), message: String::new(),
                                        trace: None,
                                    }));
                                    if tx.send(result).await.is_err() { return }
                                }
                                Mode::Hold(events) => {
                                    let _ = events.send(HeldEvent::Assigned {
                                        job_id: a.job_id, epoch: a.epoch, outbound: tx.clone(),
                                    });
                                }
                            }
                        }
                        ServerMsg::ResultAck(ack) => {
                            let done = now_ns();
                            if let Some((_, created)) = running.remove(&ack.job_id) {
                                if let Some(created) = created {
                                    recorder.to_completed.lock().unwrap_or_else(|e| e.into_inner())
                                        .push(done.saturating_sub(created));
                                }
                                recorder.completed.fetch_add(1, Ordering::Relaxed);
                                recorder.progress.notify_waiters();
                            }
                            if let Mode::Hold(events) = &mode {
                                let _ = events.send(HeldEvent::ResultAck);
                            }
                        }
                        ServerMsg::LogAck(ack) => {
                            if let Mode::Hold(events) = &mode {
                                let _ = events.send(HeldEvent::LogAck { committed: ack.committed_offset });
                            }
                        }
                        ServerMsg::Stale(stale) => {
                            recorder.stale.fetch_add(1, Ordering::Relaxed);
                            running.remove(&stale.job_id);
                        }
                        ServerMsg::Error(e) => {
                            let n = recorder.errors.fetch_add(1, Ordering::Relaxed);
                            if n < 5 {
                                eprintln!("yard-bench: gateway refused a message: code {} {}", e.code, e.message);
                            }
                        }
                        _ => {}
                    }
                }
                _ = heartbeat.tick() => {
                    let held = running.iter().map(|(id, (epoch, _))| pb::RunningJob {
                        job_id: id.clone(), epoch: *epoch, log_offset: 0,
                    }).collect();
                    if tx.send(message(AgentMsg::Heartbeat(pb::Heartbeat { running: held }))).await.is_err() {
                        return;
                    }
                }
            }
        }
    });
    Ok(Session { task })
}

/// Registers `count` agents with `label` and opens their sessions.
pub async fn fleet(
    api: &crate::api::Api,
    grpc: &str,
    label: &str,
    count: usize,
    capacity: u32,
    mode: Mode,
    recorder: Arc<Recorder>,
) -> anyhow::Result<Vec<Session>> {
    let token = api.registration_token(count as u32).await?;
    let mut sessions = Vec::with_capacity(count);
    for i in 0..count {
        let agent = register(grpc, &token, &format!("{label}-{i}"), label, capacity).await?;
        sessions.push(
            open_session(
                grpc,
                &agent,
                label,
                capacity,
                mode.clone(),
                recorder.clone(),
            )
            .await?,
        );
    }
    Ok(sessions)
}
