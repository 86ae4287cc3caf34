//! job-api as a client sees it, over both replicas: a request that fails
//! (replica killed, PostgreSQL restarting) is sent again to the other one
//! with the same `Idempotency-Key`, so a retry never creates a job twice.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};
use uuid::Uuid;

pub struct Api {
    pub http: reqwest::Client,
    pub bases: Vec<String>,
    pub org: String,
    pub token: String,
    next: AtomicUsize,
}

impl Api {
    pub fn new(http: reqwest::Client, bases: Vec<String>, org: &str, token: &str) -> Self {
        Self {
            http,
            bases,
            org: org.to_owned(),
            token: token.to_owned(),
            next: AtomicUsize::new(0),
        }
    }

    /// POST to `/v1/orgs/{org}/{path}` on the replicas in turn until one
    /// answers with a success, retrying for up to `within`.
    pub async fn post(
        &self,
        path: &str,
        body: &Value,
        idempotency_key: Option<&str>,
        within: Duration,
    ) -> anyhow::Result<Value> {
        let deadline = Instant::now() + within;
        loop {
            let base = &self.bases[self.next.fetch_add(1, Ordering::Relaxed) % self.bases.len()];
            let mut request = self
                .http
                .post(format!("{base}/v1/orgs/{}/{path}", self.org))
                .bearer_auth(&self.token)
                .timeout(Duration::from_secs(10))
                .json(body);
            if let Some(key) = idempotency_key {
                request = request.header("Idempotency-Key", key);
            }
            let last_error = match request.send().await {
                Ok(response) if response.status().is_success() => {
                    return response.json().await.context("a JSON answer");
                }
                Ok(response) if response.status().is_client_error() => {
                    let status = response.status();
                    bail!(
                        "POST {path}: {status}: {}",
                        response.text().await.unwrap_or_default()
                    );
                }
                Ok(response) => response.status().to_string(),
                Err(e) => e.to_string(),
            };
            if Instant::now() > deadline {
                bail!("POST {path} failed on every replica for {within:?}: {last_error}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub async fn get_job(&self, id: Uuid, within: Duration) -> anyhow::Result<Value> {
        let deadline = Instant::now() + within;
        loop {
            let base = &self.bases[self.next.fetch_add(1, Ordering::Relaxed) % self.bases.len()];
            let answer = self
                .http
                .get(format!("{base}/v1/orgs/{}/jobs/{id}", self.org))
                .bearer_auth(&self.token)
                .timeout(Duration::from_secs(5))
                .send()
                .await;
            if let Ok(response) = answer
                && response.status().is_success()
                && let Ok(job) = response.json::<Value>().await
            {
                return Ok(job);
            }
            if Instant::now() > deadline {
                bail!("GET job {id} failed on every replica for {within:?}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub async fn create_job(&self, job: &Value, within: Duration) -> anyhow::Result<Uuid> {
        let key = Uuid::new_v4().to_string();
        let created = self.post("jobs", job, Some(&key), within).await?;
        job_id(&created)
    }

    pub async fn create_batch(
        &self,
        jobs: Vec<Value>,
        within: Duration,
    ) -> anyhow::Result<Vec<Uuid>> {
        let key = Uuid::new_v4().to_string();
        let created = self
            .post("jobs/batch", &json!({ "jobs": jobs }), Some(&key), within)
            .await?;
        created["jobs"]
            .as_array()
            .context("a batch answer without `jobs`")?
            .iter()
            .map(job_id)
            .collect()
    }

    pub async fn registration_token(&self, uses: u32) -> anyhow::Result<String> {
        let body = json!({ "description": "yard-fault", "max_uses": uses, "ttl_secs": 3600 });
        let created = self
            .post("registration-tokens", &body, None, Duration::from_secs(20))
            .await?;
        Ok(created["token"]
            .as_str()
            .context("no registration token in the answer")?
            .to_owned())
    }
}

fn job_id(job: &Value) -> anyhow::Result<Uuid> {
    job["id"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no job id in {job}"))
}
