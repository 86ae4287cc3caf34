//! What job-api writes to its JSON log: an access line per request inside
//! the request span, so it carries the request id and the trace id (the
//! caller's, when it sent a `traceparent`); never the bearer token or the
//! database URL. Probes are not logged at `info`.
//!
//! Its own test binary, because it installs the process-wide subscriber.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use test_support::{TestDb, TestRedis, common_config, spawn_service};

const SECRET: &str = "logs-test-secret";
const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

/// Log output collected in memory.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn lines(&self) -> Vec<serde_json::Value> {
        let bytes = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        String::from_utf8_lossy(&bytes)
            .lines()
            .map(|line| serde_json::from_str(line).expect("every log line is JSON"))
            .collect()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn access_lines_carry_request_and_trace_ids_and_no_secrets() {
    let captured = Captured::default();
    let _guard = telemetry::init_with_writer(
        &telemetry::TelemetryConfig {
            service_name: job_api::SERVICE,
            log_format: telemetry::LogFormat::Json,
            filter: Some("info".into()),
            otlp_endpoint: None,
        },
        {
            let captured = captured.clone();
            move || captured.clone()
        },
    )
    .expect("telemetry");

    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let database_url = db.url().to_owned();
    let config = job_api::Config {
        common: common_config(job_api::SERVICE, &db, redis.url(), redis.prefix()),
        addr: "127.0.0.1:0".parse().expect("addr"),
        auth: auth::AuthConfig {
            hs256_secret: Some(SECRET.into()),
            ..auth::AuthConfig::default()
        },
        cancel_grace: Duration::from_secs(30),
        cors_origins: Vec::new(),
        lease_on_create: Some(Duration::from_secs(10)),
    };
    let service = spawn_service(move |listener, shutdown| job_api::run(config, listener, shutdown));
    let token = auth::dev::mint_hs256(
        SECRET,
        None,
        "user-1",
        &[(
            domain::OrgId::parse("acme").expect("org"),
            auth::Role::Member,
        )],
        Duration::from_secs(600),
    );
    let client = reqwest::Client::new();
    let created = client
        .post(format!("{}/v1/orgs/acme/jobs", service.url()))
        .bearer_auth(&token)
        .header("traceparent", format!("00-{TRACE_ID}-00f067aa0ba902b7-01"))
        .json(&serde_json::json!({"command": "echo hi"}))
        .send()
        .await
        .expect("create");
    assert_eq!(created.status(), 201);
    let request_id = created.headers()["x-request-id"]
        .to_str()
        .expect("ascii")
        .to_owned();
    let refused = client
        .get(format!("{}/v1/orgs/acme/jobs", service.url()))
        .bearer_auth("not-a-valid-token-but-still-a-secret")
        .send()
        .await
        .expect("list");
    assert_eq!(refused.status(), 401);
    client
        .get(format!("{}/healthz", service.url()))
        .send()
        .await
        .expect("healthz");
    service.stop().await.expect("clean shutdown");

    let lines = captured.lines();
    let served: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|l| l["message"] == "request served")
        .collect();
    let creation = served
        .iter()
        .find(|l| l["http.status"] == 201)
        .unwrap_or_else(|| panic!("no access line for the creation in {lines:#?}"));
    let span = &creation["span"];
    assert_eq!(span["request.id"], request_id.as_str(), "{creation}");
    assert_eq!(span["trace_id"], TRACE_ID, "the caller's trace: {creation}");
    assert_eq!(span["http.method"], "POST");

    // A request without a traceparent gets a trace of its own, logged too.
    let refusal = served
        .iter()
        .find(|l| l["http.status"] == 401)
        .expect("an access line for the refusal");
    let own_trace = refusal["span"]["trace_id"].as_str().expect("a trace id");
    assert_eq!(own_trace.len(), 32);
    assert_ne!(own_trace, TRACE_ID);

    assert!(
        !served.iter().any(|l| l["span"]["http.path"] == "/healthz"),
        "probes are not logged at info"
    );
    let everything: String = lines.iter().map(|l| l.to_string()).collect();
    assert!(
        !everything.contains(&token),
        "the bearer token is not logged"
    );
    assert!(!everything.contains("not-a-valid-token-but-still-a-secret"));
    assert!(
        !everything.contains(&database_url),
        "the database URL is not logged"
    );
}
