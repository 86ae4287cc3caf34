use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn redis_url() -> String {
    std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

fn shared_is_cluster() -> bool {
    std::env::var("TEST_REDIS_CLUSTER").is_ok_and(|v| v == "true" || v == "1")
}

/// The master name when the shared test Redis is reached through
/// Sentinels (`TEST_REDIS_SENTINEL_MASTER`; `TEST_REDIS_URL` then lists
/// the Sentinels).
pub fn shared_sentinel_master() -> Option<String> {
    std::env::var("TEST_REDIS_SENTINEL_MASTER")
        .ok()
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
}

/// Whether `url` is the shared test Redis and that is a cluster.
pub(crate) fn is_shared_cluster(url: &str) -> bool {
    shared_is_cluster() && url == redis_url()
}

/// The master name if `url` is the shared test Redis behind Sentinels.
/// A private [`RedisServer`] is always a single Redis.
pub(crate) fn shared_sentinel_master_for(url: &str) -> Option<String> {
    shared_sentinel_master().filter(|_| url == redis_url())
}

/// Bus settings for `url` (the shared Redis or a [`RedisServer`]) and `prefix`.
pub fn bus_config(url: &str, prefix: &str) -> bus::BusConfig {
    if is_shared_cluster(url) {
        bus::BusConfig::cluster(url, prefix)
    } else if let Some(master) = shared_sentinel_master_for(url) {
        bus::BusConfig::sentinel(url, master, prefix)
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

    /// The Sentinel master name when the shared Redis is behind Sentinels,
    /// else empty (`REDIS_SENTINEL_MASTER` for a child process; empty
    /// counts as unset).
    pub fn sentinel_master(&self) -> String {
        shared_sentinel_master_for(&self.url).unwrap_or_default()
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

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// A private Redis Sentinel deployment of its own: a primary, one replica
/// and three Sentinels (quorum 2) on free loopback ports, for tests that
/// force failovers without disturbing the shared Redis or other tests.
/// Everything is stopped, and its directory removed, on drop.
pub struct SentinelSetup {
    master: String,
    dir: std::path::PathBuf,
    /// The two data nodes: the first starts as primary.
    data_ports: [u16; 2],
    sentinel_ports: [u16; 3],
    children: Vec<(u16, Child)>,
}

impl SentinelSetup {
    /// Starts everything and waits until the Sentinels know the replica and
    /// each other, so a failover can proceed. Blocking: call it from
    /// `spawn_blocking` in async tests.
    pub fn start(master: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "switchyard-sentinel-{}",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&dir).expect("sentinel test directory");
        let mut setup = Self {
            master: master.to_owned(),
            dir,
            data_ports: [free_port(), free_port()],
            sentinel_ports: [free_port(), free_port(), free_port()],
            children: Vec::new(),
        };
        let [primary, replica] = setup.data_ports;
        for (port, replica_of) in [(primary, None), (replica, Some(primary))] {
            // A config file, not only arguments: Sentinel runs CONFIG
            // REWRITE on the nodes it reconfigures.
            let mut conf = format!(
                "port {port}\nbind 127.0.0.1\nsave \"\"\nappendonly no\ndir {}\n",
                setup.dir.display()
            );
            conf.push_str(&format!("dbfilename dump-{port}.rdb\n"));
            if let Some(primary) = replica_of {
                conf.push_str(&format!("replicaof 127.0.0.1 {primary}\n"));
            }
            setup.spawn(port, &conf, false);
        }
        for port in setup.sentinel_ports {
            let conf = format!(
                "port {port}\nbind 127.0.0.1\ndir {dir}\n\
                 sentinel monitor {master} 127.0.0.1 {primary} 2\n\
                 sentinel down-after-milliseconds {master} 1000\n\
                 sentinel failover-timeout {master} 5000\n\
                 sentinel parallel-syncs {master} 1\n",
                dir = setup.dir.display(),
            );
            setup.spawn(port, &conf, true);
        }
        setup.wait_until_formed();
        setup
    }

    fn spawn(&mut self, port: u16, conf: &str, sentinel: bool) {
        let path = self.dir.join(format!("{port}.conf"));
        std::fs::write(&path, conf).expect("write redis config");
        let mut command = Command::new("redis-server");
        command.arg(&path);
        if sentinel {
            command.arg("--sentinel");
        }
        let child = command
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server (is it installed? `scripts/test.sh` installs it)");
        self.children.push((port, child));
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "redis on port {port} did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn wait_until_formed(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if self.formed().unwrap_or(false) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the Sentinels did not see the replica and each other within 30 s (see {})",
                self.dir.display()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Every Sentinel sees a healthy replica and the two other Sentinels,
    /// and the replica's link to the primary is up.
    fn formed(&self) -> redis::RedisResult<bool> {
        let info: String = redis::cmd("INFO")
            .arg("replication")
            .query(&mut connect(self.data_ports[1])?)?;
        if !info.contains("master_link_status:up") {
            return Ok(false);
        }
        for port in self.sentinel_ports {
            let mut conn = connect(port)?;
            let replicas: Vec<std::collections::HashMap<String, String>> = redis::cmd("SENTINEL")
                .arg("REPLICAS")
                .arg(&self.master)
                .query(&mut conn)?;
            let healthy = replicas.iter().any(|r| {
                r.get("flags").is_some_and(|f| {
                    !f.contains("s_down") && !f.contains("disconnected") && f.contains("slave")
                })
            });
            let others: Vec<redis::Value> = redis::cmd("SENTINEL")
                .arg("SENTINELS")
                .arg(&self.master)
                .query(&mut conn)?;
            if !healthy || others.len() < 2 {
                return Ok(false);
            }
        }
        Ok(true)
    }

    pub fn master(&self) -> &str {
        &self.master
    }

    /// The Sentinels' URLs, comma-separated: `REDIS_URL` with
    /// `REDIS_SENTINEL_MASTER`.
    pub fn sentinel_urls(&self) -> String {
        self.sentinel_ports
            .iter()
            .map(|port| format!("redis://127.0.0.1:{port}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Bus settings reaching this setup's primary through its Sentinels.
    pub fn bus_config(&self, prefix: &str) -> bus::BusConfig {
        bus::BusConfig::sentinel(self.sentinel_urls(), &self.master, prefix)
    }

    /// The two data nodes' URLs (primary first at start; roles swap on
    /// failover).
    pub fn data_urls(&self) -> [String; 2] {
        self.data_ports
            .map(|port| format!("redis://127.0.0.1:{port}"))
    }

    /// The primary's port as the first Sentinel names it.
    pub fn primary_port(&self) -> redis::RedisResult<u16> {
        let (_, port): (String, u16) = redis::cmd("SENTINEL")
            .arg("GET-MASTER-ADDR-BY-NAME")
            .arg(&self.master)
            .query(&mut connect(self.sentinel_ports[0])?)?;
        Ok(port)
    }

    /// Forces a failover (`SENTINEL FAILOVER`) and waits until every
    /// Sentinel names the other node and both nodes have taken their new
    /// roles. Returns `(old primary, new primary)` ports.
    pub fn failover(&self) -> (u16, u16) {
        let old = self.primary_port().expect("primary before failover");
        let new = if old == self.data_ports[0] {
            self.data_ports[1]
        } else {
            self.data_ports[0]
        };
        let _: () = redis::cmd("SENTINEL")
            .arg("FAILOVER")
            .arg(&self.master)
            .query(&mut connect(self.sentinel_ports[0]).expect("sentinel"))
            .expect("SENTINEL FAILOVER");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if self.settled(old, new).unwrap_or(false) {
                return (old, new);
            }
            assert!(
                Instant::now() < deadline,
                "failover from {old} to {new} did not complete within 30 s (see {})",
                self.dir.display()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Kills the data node on `port` (SIGKILL: no goodbye to anyone), as
    /// a crashed primary would go.
    pub fn kill_node(&mut self, port: u16) {
        if let Some((_, child)) = self.children.iter_mut().find(|(p, _)| *p == port) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Waits until every Sentinel names a primary other than `old`, and
    /// returns its port.
    pub fn wait_for_new_primary(&self, old: u16, within: Duration) -> u16 {
        let deadline = Instant::now() + within;
        loop {
            let named: Option<Vec<u16>> = self
                .sentinel_ports
                .iter()
                .map(|port| {
                    redis::cmd("SENTINEL")
                        .arg("GET-MASTER-ADDR-BY-NAME")
                        .arg(&self.master)
                        .query::<(String, u16)>(&mut connect(*port).ok()?)
                        .ok()
                        .map(|(_, p)| p)
                })
                .collect();
            if let Some(named) = named
                && named.iter().all(|p| *p != old && *p == named[0])
            {
                return named[0];
            }
            assert!(
                Instant::now() < deadline,
                "the Sentinels named no new primary within {within:?} (see {})",
                self.dir.display()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn settled(&self, old: u16, new: u16) -> redis::RedisResult<bool> {
        for port in self.sentinel_ports {
            let (_, named): (String, u16) = redis::cmd("SENTINEL")
                .arg("GET-MASTER-ADDR-BY-NAME")
                .arg(&self.master)
                .query(&mut connect(port)?)?;
            if named != new {
                return Ok(false);
            }
        }
        let role = |port| -> redis::RedisResult<redis::Role> {
            redis::cmd("ROLE").query(&mut connect(port)?)
        };
        Ok(matches!(role(new)?, redis::Role::Primary { .. })
            && matches!(role(old)?, redis::Role::Replica { .. }))
    }
}

fn connect(port: u16) -> redis::RedisResult<redis::Connection> {
    redis::Client::open(format!("redis://127.0.0.1:{port}"))?
        .get_connection_with_timeout(Duration::from_secs(2))
}

impl Drop for SentinelSetup {
    fn drop(&mut self) {
        for (_, child) in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
