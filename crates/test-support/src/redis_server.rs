use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn redis_url() -> String {
    std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

fn shared_is_cluster() -> bool {
    std::env::var("TEST_REDIS_CLUSTER").is_ok_and(|v| v == "true" || v == "1")
}

/// Whether `url` is the shared test Redis and that is a cluster.
pub(crate) fn is_shared_cluster(url: &str) -> bool {
    shared_is_cluster() && url == redis_url()
}

/// Bus settings for `url` (the shared Redis or a [`RedisServer`]) and `prefix`.
pub fn bus_config(url: &str, prefix: &str) -> bus::BusConfig {
    if is_shared_cluster(url) {
        bus::BusConfig::cluster(url, prefix)
    } else {
        bus::BusConfig::new(url, prefix)
    }
}

/// The shared Redis with a key and channel prefix of this test's own.
pub struct TestRedis {
    url: String,
    prefix: String,
}

impl TestRedis {
    pub fn new() -> Self {
        Self {
            url: redis_url(),
            prefix: format!("test:{}:", uuid::Uuid::new_v4().simple()),
        }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// Whether the shared Redis is a cluster (`REDIS_CLUSTER` for a child process).
    pub fn is_cluster(&self) -> bool {
        is_shared_cluster(&self.url)
    }

    /// Every key and channel this test uses starts with this.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }
}

impl Default for TestRedis {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TestRedis {
    fn drop(&mut self) {
        let url = self.url.clone();
        let pattern = format!("{}*", self.prefix);
        let handle = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            runtime.block_on(async move {
                let Ok(bus) = bus::Bus::connect(&bus_config(&url, "")) else {
                    return;
                };
                let mut conn = bus.connection();
                let keys: Vec<String> = redis::cmd("KEYS")
                    .arg(&pattern)
                    .query_async(&mut conn)
                    .await
                    .unwrap_or_default();
                // One DEL per key: on a cluster the keys span shards.
                let mut pipe = redis::pipe();
                for key in keys {
                    pipe.cmd("DEL").arg(key).ignore();
                }
                let _: Result<(), _> = pipe.query_async(&mut conn).await;
            });
        });
        let _ = handle.join();
    }
}

/// A private `redis-server` process on a free loopback port, which a test
/// may stop and start again (on the same port) without touching anyone else.
pub struct RedisServer {
    port: u16,
    child: Option<Child>,
}

impl RedisServer {
    pub fn start() -> Self {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let mut server = Self { port, child: None };
        server.restart();
        server
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server (again) and waits until it accepts connections.
    pub fn restart(&mut self) {
        self.stop();
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server (is it installed? `scripts/test.sh` installs it)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}
