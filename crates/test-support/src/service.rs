use std::future::Future;
use std::net::{SocketAddr, TcpListener};

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A service running in-process; shut down (and awaited) on drop or `stop`.
pub struct RunningService {
    pub addr: SocketAddr,
    shutdown: CancellationToken,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl RunningService {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Signals shutdown and waits for the service to finish.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        match self.task.take() {
            Some(task) => task.await?,
            None => Ok(()),
        }
    }
}

impl Drop for RunningService {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Binds 127.0.0.1:0 and runs `start(listener, shutdown)` on a task.
pub fn spawn_service<F, Fut>(start: F) -> RunningService
where
    F: FnOnce(TcpListener, CancellationToken) -> Fut,
    Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind port 0");
    let addr = listener.local_addr().expect("local addr");
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(start(listener, shutdown.clone()));
    RunningService {
        addr,
        shutdown,
        task: Some(task),
    }
}
