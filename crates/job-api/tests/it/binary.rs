//! The binary as an operator runs it: subcommands, config errors, signals.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use test_support::{TestDb, TestRedis};

const BINARY: &str = env!("CARGO_BIN_EXE_job-api");

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_variable_stops_start_up_with_one_line_naming_it() {
    let output = Command::new(BINARY)
        .env_clear()
        .env("REDIS_URL", "redis://127.0.0.1:6379")
        .output()
        .expect("run");
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("DATABASE_URL"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn migrate_subcommand_applies_nothing_twice_and_exits_zero() {
    let db = TestDb::new().await;
    let output = Command::new(BINARY)
        .arg("migrate")
        .env("AUTH_HS256_SECRET", "binary-test-secret")
        .envs(db.env_vars())
        .env("REDIS_URL", "redis://127.0.0.1:6379")
        .env("LOG_FORMAT", "json")
        .output()
        .expect("run");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let logs = String::from_utf8_lossy(&output.stdout);
    assert!(
        logs.contains("\"applied\":0"),
        "the template is already migrated: {logs}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_drains_and_exits_zero() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let port = free_port();
    let mut child = Command::new(BINARY)
        .envs(db.env_vars())
        .env("REDIS_URL", redis.url())
        .env("REDIS_CLUSTER", redis.is_cluster().to_string())
        .env("REDIS_SENTINEL_MASTER", redis.sentinel_master())
        .env("REDIS_KEY_PREFIX", redis.prefix())
        .env("JOB_API_ADDR", format!("127.0.0.1:{port}"))
        .env("AUTH_HS256_SECRET", "binary-test-secret")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let ready = client
            .get(format!("http://127.0.0.1:{port}/readyz"))
            .send()
            .await;
        if ready.is_ok_and(|r| r.status() == 200) {
            break;
        }
        assert!(Instant::now() < deadline, "never became ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(15);
    let exit = loop {
        if let Some(exit) = child.try_wait().expect("wait") {
            break exit;
        }
        assert!(Instant::now() < deadline, "did not stop after SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(exit.code(), Some(0));
}
