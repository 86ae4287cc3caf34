//! Acceptance 6: the dashboard in headless Chromium. It signs in with the
//! token from the link, submits a job through job-api, and shows the job's
//! log lines and final status as the (test-played) agent produces them.
//!
//! Needs `chromium` on PATH; runs with `--features browser-test`. Chromium
//! runs with web security off because job-api does not send CORS headers
//! yet (see the crate's README notes).

use std::process::Stdio;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use test_support::{TestDb, TestRedis, common_config, spawn_service};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio_tungstenite::tungstenite::Message;

use crate::support::{SECRET, Writer, bus, config, start_with, token};

/// A Chrome DevTools Protocol session on one page.
struct Cdp {
    ws: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    next_id: u64,
    session: Option<String>,
}

impl Cdp {
    async fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut message = json!({"id": id, "method": method, "params": params});
        if let Some(session) = &self.session {
            message["sessionId"] = json!(session);
        }
        self.ws
            .send(Message::text(message.to_string()))
            .await
            .expect("cdp send");
        loop {
            let Some(Ok(Message::Text(text))) = self.ws.next().await else {
                continue;
            };
            let reply: Value = serde_json::from_str(text.as_str()).expect("cdp json");
            if reply["id"] == json!(id) {
                assert!(reply.get("error").is_none(), "{method}: {reply}");
                return reply["result"].clone();
            }
        }
    }

    async fn eval(&mut self, expression: &str) -> Value {
        let result = self
            .call(
                "Runtime.evaluate",
                json!({"expression": expression, "returnByValue": true, "awaitPromise": true}),
            )
            .await;
        result["result"]["value"].clone()
    }

    async fn wait_for(&mut self, what: &str, expression: &str, limit: Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if self.eval(expression).await == json!(true) {
                return;
            }
            if tokio::time::Instant::now() > deadline {
                let page = self
                    .eval("document.body ? document.body.innerText : ''")
                    .await;
                panic!("timed out waiting for {what}; page shows:\n{page}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_dashboard_submits_a_job_and_shows_its_log_and_final_status() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let api_config = job_api::Config {
        common: common_config(job_api::SERVICE, &db, redis.url(), redis.prefix()),
        addr: "127.0.0.1:0".parse().expect("addr"),
        auth: auth::AuthConfig {
            hs256_secret: Some(SECRET.into()),
            ..auth::AuthConfig::default()
        },
        cancel_grace: Duration::from_secs(30),
        cors_origins: vec!["*".into()],
        lease_on_create: Some(Duration::from_secs(10)),
    };
    let api = spawn_service(move |listener, shutdown| job_api::run(api_config, listener, shutdown));
    let mut broadcaster_config = config(&db, redis.url(), redis.prefix());
    broadcaster_config.dashboard_api_url = api.url();
    let broadcaster = start_with(broadcaster_config);

    let profile = std::env::temp_dir().join(format!("sy-chromium-{}", uuid::Uuid::new_v4()));
    let mut chromium = tokio::process::Command::new("chromium")
        .args([
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-web-security",
            "--remote-debugging-port=0",
            "about:blank",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start chromium (apt-get install chromium)");
    let stderr = chromium.stderr.take().expect("stderr");
    let mut lines = BufReader::new(stderr).lines();
    let devtools = tokio::time::timeout(Duration::from_secs(20), async {
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(url) = line.strip_prefix("DevTools listening on ") {
                return url.trim().to_owned();
            }
        }
        panic!("chromium exited without a DevTools URL");
    })
    .await
    .expect("chromium started");
    // Keep draining Chromium's log so it never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });

    let (ws, _) = tokio_tungstenite::connect_async(devtools.as_str())
        .await
        .expect("devtools");
    let mut cdp = Cdp {
        ws,
        next_id: 0,
        session: None,
    };
    let link = format!("{}/#token={}", broadcaster.url(), token(&["acme"]));
    let target = cdp.call("Target.createTarget", json!({"url": link})).await;
    let attached = cdp
        .call(
            "Target.attachToTarget",
            json!({"targetId": target["targetId"], "flatten": true}),
        )
        .await;
    cdp.session = attached["sessionId"].as_str().map(str::to_owned);

    cdp.wait_for(
        "the signed-in dashboard, live",
        "!document.getElementById('app').hidden && document.getElementById('conn').textContent === 'live'",
        Duration::from_secs(20),
    )
    .await;
    cdp.eval(
        "document.getElementById('command').value = 'echo hello'; \
         document.getElementById('submit-form').requestSubmit(); true",
    )
    .await;

    // Play the agent: take the job the browser submitted and run it.
    let org = domain::OrgId::parse("acme").expect("org");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let job = loop {
        let mut conn = db.conn().await;
        let jobs = db::jobs::list(
            &mut conn,
            &org,
            &db::jobs::ListFilter {
                limit: 10,
                ..db::jobs::ListFilter::default()
            },
        )
        .await
        .expect("list");
        if let Some(job) = jobs.first() {
            break job.job_id();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the browser submitted no job"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    cdp.wait_for(
        "the job's detail panel",
        &format!("document.getElementById('detail-id').textContent === '{job}'"),
        Duration::from_secs(10),
    )
    .await;
    let mut writer = Writer::adopt(&db, bus(redis.url(), redis.prefix()), org, job).await;
    for _ in 0..5 {
        writer.append(2, 10).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    writer.finish().await;

    cdp.wait_for(
        "ten log lines and the final status",
        "(() => { const log = document.getElementById('log').textContent; \
           return log.includes('line 1 ') && log.includes('line 10 ') \
             && log.trim().split('\\n').length === 10 \
             && document.getElementById('detail-status').textContent === 'succeeded' \
             && document.querySelector('#job-rows .status').textContent === 'succeeded'; })()",
        Duration::from_secs(20),
    )
    .await;

    // Operator actions on a second job: cancel it while queued, then retry it.
    cdp.eval(
        "document.getElementById('command').value = 'sleep 600'; \
         document.getElementById('submit-form').requestSubmit(); true",
    )
    .await;
    cdp.wait_for(
        "the second job's detail panel",
        &format!(
            "document.getElementById('detail-id').textContent !== '{job}' \
               && document.getElementById('detail-status').textContent === 'queued'"
        ),
        Duration::from_secs(10),
    )
    .await;
    cdp.eval("document.querySelector('[data-action=\"cancel\"]').click(); true")
        .await;
    cdp.wait_for(
        "the second job cancelled",
        "document.getElementById('detail-status').textContent === 'cancelled' \
           && document.querySelector('#job-rows .status').textContent === 'cancelled'",
        Duration::from_secs(10),
    )
    .await;
    cdp.eval("document.querySelector('[data-action=\"retry\"]').click(); true")
        .await;
    cdp.wait_for(
        "the retried job queued again",
        "document.getElementById('detail-status').textContent === 'queued'",
        Duration::from_secs(10),
    )
    .await;

    drop(cdp);
    let _ = chromium.kill().await;
    let _ = std::fs::remove_dir_all(&profile);
    broadcaster.stop().await.expect("clean shutdown");
    api.stop().await.expect("clean shutdown");
}
