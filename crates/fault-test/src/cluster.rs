//! The processes under test: a private PostgreSQL and Redis, two replicas
//! of every service and a few agents, each a child process logging to a
//! file of its own, which the fault schedule may SIGKILL and start again.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use test_support::RedisServer;
use tokio::process::{Child, Command};

/// A free loopback port (the listener is dropped, so another process may
/// take it in between; the window is short and the ports are random).
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn running_as_root() -> bool {
    std::env::var("USER").is_ok_and(|u| u == "root")
        || std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1))
                == Some("0")
        })
}

/// A PostgreSQL cluster of our own in a temporary directory, on a free
/// port; durability settings are left at their defaults (fsync on).
pub struct Postgres {
    bin: PathBuf,
    data: PathBuf,
    pub log: PathBuf,
    pub port: u16,
    as_postgres: bool,
}

impl Postgres {
    pub async fn start(root: &Path) -> anyhow::Result<Self> {
        let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
            .context("PostgreSQL server binaries not found under /usr/lib/postgresql")?
            .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
            .filter(|bin| bin.join("initdb").exists())
            .collect();
        versions.sort_by_key(|p| {
            p.parent()
                .and_then(|v| v.file_name())
                .and_then(|v| v.to_str())
                .and_then(|v| v.parse::<u32>().ok())
                .unwrap_or(0)
        });
        let bin = versions
            .pop()
            .context("no /usr/lib/postgresql/*/bin/initdb")?;
        let dir = root.join("postgres");
        std::fs::create_dir_all(&dir)?;
        let as_postgres = running_as_root();
        if as_postgres {
            // initdb refuses to run as root: the cluster belongs to `postgres`.
            run(Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&dir))
            .await?;
        }
        let pg = Self {
            bin,
            data: dir.join("data"),
            log: dir.join("server.log"),
            port: free_port()?,
            as_postgres,
        };
        run(pg.command("initdb").arg("-D").arg(&pg.data).args([
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
        ]))
        .await?;
        let options = format!(
            "-p {} -c listen_addresses=127.0.0.1 -c unix_socket_directories={} -c max_connections=300",
            pg.port,
            dir.display()
        );
        run(pg
            .command("pg_ctl")
            .arg("-D")
            .arg(&pg.data)
            .arg("-l")
            .arg(&pg.log)
            .args(["-o", &options, "-w", "-t", "60", "start"]))
        .await?;
        Ok(pg)
    }

    fn command(&self, tool: &str) -> Command {
        let program = self.bin.join(tool);
        let mut command = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(program);
            c
        } else {
            Command::new(program)
        };
        command.stdin(Stdio::null());
        command
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// `pg_ctl restart -m fast`: every connection is dropped.
    pub async fn restart(&self) -> anyhow::Result<()> {
        run(self
            .command("pg_ctl")
            .arg("-D")
            .arg(&self.data)
            .arg("-l")
            .arg(&self.log)
            .args(["-m", "fast", "-w", "-t", "60", "restart"]))
        .await
    }

    pub async fn stop(&self) {
        let _ = run(self.command("pg_ctl").arg("-D").arg(&self.data).args([
            "-m",
            "immediate",
            "-w",
            "stop",
        ]))
        .await;
    }
}

async fn run(command: &mut Command) -> anyhow::Result<()> {
    let output = command
        .output()
        .await
        .with_context(|| format!("cannot run {command:?}"))?;
    if !output.status.success() {
        bail!(
            "{command:?} failed ({}): {}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

/// Our own redis-server (test-support's helper: SIGKILL and start again
/// on the same port).
pub struct Redis {
    server: RedisServer,
}

impl Redis {
    pub async fn start() -> anyhow::Result<Self> {
        let server = tokio::task::spawn_blocking(RedisServer::start).await?;
        Ok(Self { server })
    }

    pub fn url(&self) -> String {
        self.server.url()
    }

    pub async fn restart(self) -> anyhow::Result<Self> {
        let mut server = self.server;
        let server = tokio::task::spawn_blocking(move || {
            server.restart();
            server
        })
        .await?;
        Ok(Self { server })
    }
}

/// One child process: how to start it, where it logs, and how to tell it
/// is ready.
pub struct Proc {
    pub name: String,
    program: PathBuf,
    env: Vec<(String, String)>,
    pub log: PathBuf,
    /// `http://addr/readyz`, for services.
    pub ready_url: Option<String>,
    child: Option<Child>,
    pub starts: u32,
}

impl Proc {
    pub fn new(
        name: impl Into<String>,
        program: PathBuf,
        env: Vec<(String, String)>,
        logs: &Path,
        ready_url: Option<String>,
    ) -> Self {
        let name = name.into();
        Self {
            log: logs.join(format!("{name}.log")),
            name,
            program,
            env,
            ready_url,
            child: None,
            starts: 0,
        }
    }

    pub fn spawn(&mut self) -> anyhow::Result<()> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("cannot open {}", self.log.display()))?;
        let mut command = Command::new(&self.program);
        command
            .env_clear()
            .envs(
                ["PATH", "HOME", "TMPDIR"]
                    .iter()
                    .filter_map(|k| std::env::var(k).ok().map(|v| (k.to_string(), v))),
            )
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::from(file.try_clone()?))
            .stderr(Stdio::from(file))
            .kill_on_drop(true);
        let child = command
            .spawn()
            .with_context(|| format!("cannot start {}", self.program.display()))?;
        self.child = Some(child);
        self.starts += 1;
        Ok(())
    }

    /// SIGKILL, and reap.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.start_kill();
            let _ = child.wait().await;
        }
    }

    /// Whether the process exited on its own (a crash).
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    pub async fn wait_ready(
        &mut self,
        http: &reqwest::Client,
        within: Duration,
    ) -> anyhow::Result<()> {
        let Some(url) = self.ready_url.clone() else {
            return Ok(());
        };
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.exited() {
                bail!(
                    "{} exited ({status}); see {}",
                    self.name,
                    self.log.display()
                );
            }
            let ok = http
                .get(&url)
                .timeout(Duration::from_secs(2))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if ok {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{} not ready after {within:?}; see {}",
                    self.name,
                    self.log.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
