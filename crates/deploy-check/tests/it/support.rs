//! Helpers for running the real binaries: finding (and if needed building)
//! them, an empty database, free ports, and child processes that are
//! stopped with SIGTERM and never outlive the test.

use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant, SystemTime};

use deploy_check::Env;
use deploy_check::binaries::Program;

/// The directory holding the test executable's sibling binaries
/// (`<target>/debug`): the test executable is `<target>/debug/deps/it-…`.
pub fn binaries_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    exe.parent()
        .and_then(Path::parent)
        .expect("test executable is in <target>/<profile>/deps")
        .to_owned()
}

/// Paths of the programs' binaries, built first when missing or older than
/// the sources.
///
/// Why this way: Cargo gives a test the path of its own package's binaries
/// only (`CARGO_BIN_EXE_*`), and these are other packages'. Under
/// `cargo test --workspace` (CI, `scripts/test.sh`) Cargo has just built
/// them into `<target>/debug`, next to this test's executable, because
/// every one of those packages has integration tests; they are then newer
/// than every source file and used as they are. Run alone
/// (`cargo test -p deploy-check`), they may be missing or stale, and the
/// test builds them with the same Cargo, target directory and profile
/// (`cargo build --bins -p …`, `--release` when this test is a release
/// build), inheriting the environment so the build
/// settings (e.g. `CARGO_PROFILE_DEV_DEBUG`) match. The staleness check is
/// by modification time, like make's.
pub fn built_binaries(programs: &[Program]) -> Vec<PathBuf> {
    let dir = binaries_dir();
    let paths: Vec<PathBuf> = programs.iter().map(|p| dir.join(p.binary())).collect();
    let newest_source = newest_source_time(&deploy_check::repo_root());
    let stale = paths.iter().any(|path| {
        std::fs::metadata(path)
            .and_then(|m| m.modified())
            .map_or(true, |built| built < newest_source)
    });
    if stale {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
        let target_dir = dir.parent().expect("target directory");
        let mut command = Command::new(cargo);
        command
            .current_dir(deploy_check::repo_root())
            .args(["build", "--bins", "--target-dir"])
            .arg(target_dir);
        if dir.file_name().is_some_and(|name| name == "release") {
            command.arg("--release");
        }
        for program in programs {
            command.args(["-p", program.binary()]);
        }
        let status = command.status().expect("run cargo build");
        assert!(status.success(), "cargo build of the binaries failed");
    }
    for path in &paths {
        assert!(path.exists(), "{} was not built", path.display());
    }
    paths
}

/// The newest modification time of anything a binary is built from.
fn newest_source_time(root: &Path) -> SystemTime {
    fn walk(path: &Path, newest: &mut SystemTime) {
        let Ok(metadata) = std::fs::metadata(path) else {
            return;
        };
        if metadata.is_dir() {
            let Ok(entries) = std::fs::read_dir(path) else {
                return;
            };
            for entry in entries.flatten() {
                walk(&entry.path(), newest);
            }
        } else if let Ok(modified) = metadata.modified() {
            *newest = (*newest).max(modified);
        }
    }
    let mut newest = SystemTime::UNIX_EPOCH;
    for top in ["Cargo.toml", "Cargo.lock", "migrations", "proto"] {
        walk(&root.join(top), &mut newest);
    }
    if let Ok(crates) = std::fs::read_dir(root.join("crates")) {
        for krate in crates.flatten() {
            for part in ["Cargo.toml", "build.rs", "src"] {
                walk(&krate.path().join(part), &mut newest);
            }
        }
    }
    newest
}

/// A port nothing listens on right now (on every interface).
pub fn free_port() -> u16 {
    TcpListener::bind("0.0.0.0:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// `user:password@host:port/database`: the part of a PostgreSQL URL that
/// names the server and database.
pub fn authority_and_database(url: &str) -> &str {
    url.split_once("://")
        .map(|(_, rest)| rest.split('?').next().unwrap_or(rest))
        .expect("database URL has a scheme")
}

/// `host:port` of the server a PostgreSQL URL names.
pub fn host_port(url: &str) -> String {
    let rest = authority_and_database(url);
    let after_user = rest.rsplit_once('@').map_or(rest, |(_, hp)| hp);
    after_user
        .split('/')
        .next()
        .unwrap_or(after_user)
        .to_owned()
}

/// A program started with exactly `env` (nothing inherited), its output
/// in a log file. Killed if the test ends without stopping it.
pub struct Process {
    pub name: String,
    pub log: PathBuf,
    child: Option<Child>,
}

impl Process {
    pub fn spawn(name: &str, binary: &Path, args: &[String], env: &Env, log_dir: &Path) -> Self {
        let log = log_dir.join(format!("{name}.log"));
        let out = File::create(&log).expect("log file");
        let err = out.try_clone().expect("log file");
        let child = Command::new(binary)
            .args(args)
            .env_clear()
            .envs(env)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("start {name} ({}): {e}", binary.display()));
        Self {
            name: name.to_owned(),
            log,
            child: Some(child),
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The exit status if the process has ended.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().expect("poll child"))
    }

    /// Waits up to `timeout` for the process to end by itself.
    pub async fn wait(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exited() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Sends SIGTERM (as Docker and Kubernetes do to stop a container).
    pub fn terminate(&self) {
        let pid = self.child.as_ref().expect("running").id();
        let status = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM {pid} failed");
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take()
            && child.try_wait().ok().flatten().is_none()
        {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
