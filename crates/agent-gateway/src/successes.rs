//! Successes reported over every session of this gateway, recorded
//! together.
//!
//! Each agent session used to record its own successes, one statement and
//! one commit per batch of messages. With many agents finishing at once,
//! those transactions updated neighbouring job rows and appended to the
//! same index pages, and waited on each other's buffer locks and WAL
//! flushes. Here sessions hand their successes to a few writers; a writer
//! records everything handed over while it was busy in one statement. An
//! idle gateway writes a lone success at once: nothing waits for a batch
//! to fill.

use std::collections::HashMap;
use std::sync::Arc;

use db::Db;
use db::leases::{Succeeded, Success};
use tokio::sync::{Mutex, mpsc, oneshot};

/// Writers recording at once. One keeps the statements from contending;
/// a second fills its batch while the first waits for its commit.
const WRITERS: usize = 2;
/// Successes one statement records at most.
const BATCH_LIMIT: usize = 4_096;

/// Why a batch was not recorded; every success in it is unrecorded.
#[derive(Clone, Debug, thiserror::Error)]
#[error("recording successes failed: {0}")]
pub struct WriteFailed(String);

struct Request {
    successes: Vec<Success>,
    reply: oneshot::Sender<Result<Vec<Succeeded>, WriteFailed>>,
}

/// The sessions' side: hands successes to the writers.
#[derive(Clone)]
pub struct SuccessWriter {
    requests: mpsc::UnboundedSender<Request>,
}

impl SuccessWriter {
    /// Starts the writers; they stop when the last `SuccessWriter` clone is
    /// dropped and what was handed over is written.
    pub fn start(db: Db) -> Self {
        let (requests, incoming) = mpsc::unbounded_channel();
        let incoming = Arc::new(Mutex::new(incoming));
        for _ in 0..WRITERS {
            tokio::spawn(write(db.clone(), incoming.clone()));
        }
        Self { requests }
    }

    /// Records `successes` (with whatever other sessions handed over
    /// meanwhile); returns those recorded. A success missing from the
    /// result was refused: stale epoch, another holder, or not running.
    pub async fn record(&self, successes: Vec<Success>) -> Result<Vec<Succeeded>, WriteFailed> {
        if successes.is_empty() {
            return Ok(Vec::new());
        }
        let (reply, answer) = oneshot::channel();
        self.requests
            .send(Request { successes, reply })
            .map_err(|_| WriteFailed("the gateway is stopping".to_owned()))?;
        answer
            .await
            .map_err(|_| WriteFailed("the writer stopped".to_owned()))?
    }
}

async fn write(db: Db, incoming: Arc<Mutex<mpsc::UnboundedReceiver<Request>>>) {
    loop {
        let batch = {
            let mut incoming = incoming.lock().await;
            let Some(first) = incoming.recv().await else {
                return;
            };
            let mut size = first.successes.len();
            let mut batch = vec![first];
            while size < BATCH_LIMIT {
                let Ok(next) = incoming.try_recv() else { break };
                size += next.successes.len();
                batch.push(next);
            }
            batch
        };
        let successes: Vec<Success> = batch
            .iter()
            .flat_map(|request| request.successes.iter().copied())
            .collect();
        let written = match db.conn().await {
            Ok(mut conn) => db::leases::succeed_each(&mut conn, &successes).await,
            Err(e) => Err(e),
        };
        match written {
            Ok(recorded) => answer(batch, recorded),
            Err(e) => {
                tracing::warn!(error = %e, successes = successes.len(), "recording successes failed");
                let failed = WriteFailed(e.to_string());
                for request in batch {
                    let _ = request.reply.send(Err(failed.clone()));
                }
            }
        }
    }
}

/// Gives each request the recorded successes it handed over.
fn answer(batch: Vec<Request>, recorded: Vec<Succeeded>) {
    let mut by_request: Vec<Vec<Succeeded>> = batch.iter().map(|_| Vec::new()).collect();
    let mut owner: HashMap<(uuid::Uuid, u64), usize> = HashMap::new();
    for (index, request) in batch.iter().enumerate() {
        for success in &request.successes {
            owner
                .entry((success.job.as_uuid(), success.epoch))
                .or_insert(index);
        }
    }
    for done in recorded {
        if let Some(&index) = owner.get(&(done.job_id, done.epoch as u64)) {
            by_request[index].push(done);
        }
    }
    for (request, recorded) in batch.into_iter().zip(by_request) {
        let _ = request.reply.send(Ok(recorded));
    }
}
