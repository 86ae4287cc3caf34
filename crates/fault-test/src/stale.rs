//! A deliberate stale write. An agent of our own (HTTP pull API, the only
//! one with label `stale-probe`) claims a job at epoch e1, writes a line,
//! then goes silent until its lease is lost and the job is leased again at
//! e2. Its writes at e1 — a log line and a `succeeded` result — must be
//! refused with 409 and change nothing; its writes at e2 must be accepted.

use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use serde_json::{Value, json};
use uuid::Uuid;
use yard_proto::v1 as pb;
use yard_proto::v1::agent_gateway_client::AgentGatewayClient;

use crate::api::Api;

pub const LABEL: &str = "stale-probe";

pub struct StaleProbe {
    pub job: Uuid,
    pub stale_epoch: u64,
    pub current_epoch: u64,
    pub stale_log_status: u16,
    pub stale_result_status: u16,
}

struct PullAgent {
    http: reqwest::Client,
    gateways: Vec<String>,
    secret: String,
    token: Option<String>,
    turn: usize,
}

impl PullAgent {
    /// POST to the gateways' HTTP API in turn, re-authenticating when the
    /// session token is gone (it lives in Redis, which may restart).
    async fn post(
        &mut self,
        path: &str,
        body: Value,
        within: Duration,
    ) -> anyhow::Result<(u16, Value)> {
        let deadline = Instant::now() + within;
        loop {
            let base = self.gateways[self.turn % self.gateways.len()].clone();
            self.turn += 1;
            if self.token.is_none() {
                let answer = self
                    .http
                    .post(format!("{base}/v1/agent/auth"))
                    .bearer_auth(&self.secret)
                    .timeout(Duration::from_secs(5))
                    .send()
                    .await;
                if let Ok(response) = answer
                    && response.status().is_success()
                {
                    let session: Value = response.json().await?;
                    self.token = session["token"].as_str().map(str::to_owned);
                }
            }
            if let Some(token) = self.token.clone() {
                let answer = self
                    .http
                    .post(format!("{base}{path}"))
                    .bearer_auth(&token)
                    .timeout(Duration::from_secs(10))
                    .json(&body)
                    .send()
                    .await;
                if let Ok(response) = answer {
                    let status = response.status().as_u16();
                    if status == 401 {
                        self.token = None;
                    } else if status < 500 {
                        let body = if status == 204 {
                            Value::Null
                        } else {
                            response.json().await.unwrap_or(Value::Null)
                        };
                        return Ok((status, body));
                    }
                }
            }
            if Instant::now() > deadline {
                bail!("POST {path}: no gateway answered within {within:?}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Claims until `job` is handed out at an epoch above `above`.
    async fn claim(&mut self, job: Uuid, above: u64, within: Duration) -> anyhow::Result<u64> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            let (status, body) = self
                .post(
                    "/v1/agent/claim",
                    json!({ "max_jobs": 1, "wait_ms": 1000 }),
                    within,
                )
                .await?;
            if status == 200 {
                for claimed in body["jobs"].as_array().into_iter().flatten() {
                    let id: Option<Uuid> = claimed["job_id"].as_str().and_then(|s| s.parse().ok());
                    let epoch = claimed["epoch"].as_u64().unwrap_or(0);
                    if id == Some(job) && epoch > above {
                        return Ok(epoch);
                    }
                }
            }
        }
        bail!("job {job} was not handed out at an epoch above {above} within {within:?}")
    }
}

pub async fn run(
    api: &Api,
    grpc_gateway: &str,
    http_gateways: Vec<String>,
    within: Duration,
) -> anyhow::Result<StaleProbe> {
    let deadline = Instant::now() + within;
    let registration = api.registration_token(1).await?;
    let channel = tonic::transport::Endpoint::from_shared(grpc_gateway.to_owned())?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .context("connect to the gateway for registration")?;
    let registered = AgentGatewayClient::new(channel)
        .register(pb::RegisterRequest {
            registration_token: registration,
            name: "stale-probe".into(),
            labels: vec![LABEL.into()],
            capacity: 1,
            version: "yard-fault".into(),
        })
        .await
        .context("register the stale-probe agent")?
        .into_inner();
    let mut agent = PullAgent {
        http: api.http.clone(),
        gateways: http_gateways,
        secret: registered.agent_secret,
        token: None,
        turn: 0,
    };
    let spec = json!({
        "command": "echo stale-probe",
        "labels": [LABEL],
        "retry_policy": { "initial_interval_ms": 100, "maximum_infrastructure_attempts": 0 },
    });
    let job = api.create_job(&spec, Duration::from_secs(30)).await?;
    let left = |d: Instant| d.saturating_duration_since(Instant::now());
    let e1 = agent.claim(job, 0, left(deadline)).await?;
    let first = format!("stale-probe line at epoch {e1}\n");
    let (status, _) = agent
        .post(
            &format!("/v1/agent/jobs/{job}/logs"),
            json!({ "epoch": e1, "stream": "stdout", "offset": 0, "data": first }),
            left(deadline),
        )
        .await?;
    ensure!(
        status == 200,
        "a log write at the current epoch {e1} was answered {status}"
    );
    // Silence: no extend, so the lease is lost and the job leased again.
    let e2 = agent.claim(job, e1, left(deadline)).await?;
    let (stale_log_status, _) = agent
        .post(
            &format!("/v1/agent/jobs/{job}/logs"),
            json!({ "epoch": e1, "stream": "stdout", "offset": first.len(), "data": "STALE LINE\n" }),
            left(deadline),
        )
        .await?;
    let (stale_result_status, _) = agent
        .post(
            &format!("/v1/agent/jobs/{job}/result"),
            json!({ "epoch": e1, "outcome": "succeeded", "exit_code": 0 }),
            left(deadline),
        )
        .await?;
    // The current holder finishes the job normally.
    let (status, _) = agent
        .post(
            &format!("/v1/agent/jobs/{job}/logs"),
            json!({ "epoch": e2, "stream": "stdout", "offset": 0, "data": format!("stale-probe line at epoch {e2}\n") }),
            left(deadline),
        )
        .await?;
    ensure!(
        status == 200,
        "a log write at the current epoch {e2} was answered {status}"
    );
    let (status, _) = agent
        .post(
            &format!("/v1/agent/jobs/{job}/result"),
            json!({ "epoch": e2, "outcome": "succeeded", "exit_code": 0 }),
            left(deadline),
        )
        .await?;
    ensure!(
        status == 200,
        "the result at the current epoch {e2} was answered {status}"
    );
    Ok(StaleProbe {
        job,
        stale_epoch: e1,
        current_epoch: e2,
        stale_log_status,
        stale_result_status,
    })
}
