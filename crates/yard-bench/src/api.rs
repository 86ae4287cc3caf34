//! job-api over REST: create jobs one at a time or in batches, and mint
//! registration tokens for the simulated agents.

use anyhow::Context;
use serde_json::{Value, json};

use crate::stats::now_ns;

#[derive(Clone)]
pub struct Api {
    http: reqwest::Client,
    base: String,
    org: String,
    auth: String,
}

/// What a benchmark job carries: the label only its scenario's agents have,
/// and the client-side send time (`t`, Unix ns) that latencies start from.
pub fn job_body(label: &str, sent_ns: u64) -> Value {
    json!({
        "command": "true",
        "labels": [label],
        "metadata": { "bench_t": sent_ns },
    })
}

impl Api {
    pub fn new(base: &str, token: &str) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(256)
            .tcp_nodelay(true)
            .build()?;
        Ok(Self {
            http,
            base: base.trim_end_matches('/').to_owned(),
            org: String::new(),
            auth: format!("Bearer {token}"),
        })
    }

    async fn post(&self, path: &str, body: &Value) -> anyhow::Result<Value> {
        let url = format!("{}/v1/orgs/{}/{path}", self.base, self.org);
        let response = self
            .http
            .post(&url)
            .header("authorization", &self.auth)
            .json(body)
            .send()
            .await
            .with_context(|| format!("POST {url}"))?;
        let status = response.status();
        let text = response.text().await?;
        anyhow::ensure!(
            status.is_success(),
            "POST {url}: {status}: {}",
            text.chars().take(400).collect::<String>()
        );
        Ok(serde_json::from_str(&text)?)
    }

    /// The same client acting in another org (the token must be a member).
    /// Each scenario has its own org: the scheduler dispatches per org, so
    /// one scenario's leftovers cannot hold up the next.
    pub fn org(&self, org: &str) -> Self {
        Self {
            org: org.to_owned(),
            ..self.clone()
        }
    }

    /// Creates one job stamped with the time just before the request; returns its id.
    pub async fn create_job(&self, label: &str) -> anyhow::Result<String> {
        let created = self.post("jobs", &job_body(label, now_ns())).await?;
        created["id"]
            .as_str()
            .map(str::to_owned)
            .context("job-api answered without a job id")
    }

    /// Creates `count` jobs in one batch request; returns how many were created.
    pub async fn create_batch(&self, label: &str, count: usize) -> anyhow::Result<usize> {
        let sent = now_ns();
        let jobs: Vec<Value> = (0..count).map(|_| job_body(label, sent)).collect();
        let created = self.post("jobs/batch", &json!({ "jobs": jobs })).await?;
        let n = created["jobs"].as_array().map_or(0, Vec::len);
        anyhow::ensure!(n == count, "batch created {n} jobs, not {count}");
        Ok(n)
    }

    /// A registration token for `uses` agents.
    pub async fn registration_token(&self, uses: u32) -> anyhow::Result<String> {
        let created = self
            .post(
                "registration-tokens",
                &json!({ "description": "yard-bench", "max_uses": uses.max(1), "ttl_secs": 3600 }),
            )
            .await?;
        created["token"]
            .as_str()
            .map(str::to_owned)
            .context("no token in the registration-token answer")
    }
}
