//! The REST surface against real PostgreSQL and Redis.

use std::time::Duration;

use auth::Role;
use domain::OrgId;
use reqwest::{Client, Method, StatusCode};
use serde_json::{Value, json};
use test_support::{RunningService, TestDb, TestRedis, common_config, spawn_service};

const SECRET: &str = "api-test-secret";

pub struct Api {
    pub service: RunningService,
    pub db: TestDb,
    redis: TestRedis,
    pub client: Client,
}

impl Api {
    pub async fn start() -> Self {
        let db = TestDb::new().await;
        let redis = TestRedis::new();
        let service = Self::replica_on(&db, &redis);
        Self {
            service,
            db,
            redis,
            client: Client::new(),
        }
    }

    fn replica_on(db: &TestDb, redis: &TestRedis) -> RunningService {
        let config = job_api::Config {
            common: common_config(job_api::SERVICE, db, redis.url(), redis.prefix()),
            addr: "127.0.0.1:0".parse().expect("addr"),
            auth: auth::AuthConfig {
                hs256_secret: Some(SECRET.into()),
                ..auth::AuthConfig::default()
            },
            cancel_grace: Duration::from_secs(30),
            cors_origins: vec!["http://127.0.0.1:8090".into()],
            lease_on_create: Some(Duration::from_secs(10)),
        };
        spawn_service(move |listener, shutdown| job_api::run(config, listener, shutdown))
    }

    /// Another job-api process on the same database and Redis.
    pub fn another_replica(&self) -> RunningService {
        Self::replica_on(&self.db, &self.redis)
    }

    pub fn token(org: &str, role: Role) -> String {
        auth::dev::mint_hs256(
            SECRET,
            None,
            "user-1",
            &[(OrgId::parse(org).expect("org"), role)],
            Duration::from_secs(600),
        )
    }

    pub async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut request = self
            .client
            .request(method, format!("{}{path}", self.service.url()));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.expect("request");
        let status = response.status();
        let text = response.text().await.expect("body");
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_is_created_listed_shown_and_cancelled() {
    let api = Api::start().await;
    let token = Api::token("acme", Role::Member);
    let (status, job) = api
        .call(
            Method::POST,
            "/v1/orgs/acme/jobs",
            Some(&token),
            Some(json!({"command": "echo hi", "labels": ["linux"]})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{job}");
    assert_eq!(job["status"], "queued");
    assert_eq!(job["queue"], "backlog");
    assert_eq!(job["command"], "echo hi");
    let id = job["id"].as_str().expect("id").to_owned();

    let (status, detail) = api
        .call(
            Method::GET,
            &format!("/v1/orgs/acme/jobs/{id}"),
            Some(&token),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(detail["queue_position"], 1);
    assert_eq!(
        detail["blocked_reason"]["reason"], "no_agent_with_labels",
        "{detail}"
    );

    let (status, page) = api
        .call(
            Method::GET,
            "/v1/orgs/acme/jobs?status=queued",
            Some(&token),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(page["items"].as_array().expect("items").len(), 1);

    let (status, cancelled) = api
        .call(
            Method::POST,
            &format!("/v1/orgs/acme/jobs/{id}/cancel"),
            Some(&token),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(cancelled["status"], "cancelled");
    let (status, again) = api
        .call(
            Method::POST,
            &format!("/v1/orgs/acme/jobs/{id}/approve"),
            Some(&Api::token("acme", Role::Admin)),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{again}");

    let (status, audit) = api
        .call(Method::GET, "/v1/orgs/acme/audit", Some(&token), None)
        .await;
    assert_eq!(status, StatusCode::OK);
    let actions: Vec<&str> = audit["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter_map(|e| e["action"].as_str())
        .collect();
    assert_eq!(actions, ["job.cancelled", "job.created"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn invalid_input_gets_problem_details_per_field() {
    let api = Api::start().await;
    let token = Api::token("acme", Role::Member);
    let (status, problem) = api
        .call(
            Method::POST,
            "/v1/orgs/acme/jobs",
            Some(&token),
            Some(json!({"priority": 99999, "labels": ["BAD LABEL"]})),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let fields: Vec<&str> = problem["errors"]
        .as_array()
        .expect("errors")
        .iter()
        .filter_map(|e| e["field"].as_str())
        .collect();
    assert!(
        fields.contains(&"priority")
            && fields.contains(&"labels[0]")
            && fields.contains(&"payload"),
        "{problem}"
    );
    let (status, problem) = api
        .call(
            Method::POST,
            "/v1/orgs/acme/jobs",
            Some(&token),
            Some(json!({"command": "x", "surprise": 1})),
        )
        .await;
    assert_eq!(
        status,
        StatusCode::BAD_REQUEST,
        "unknown fields are refused: {problem}"
    );
    let huge = "x".repeat(2 * 1024 * 1024);
    let (status, _) = api
        .call(
            Method::POST,
            "/v1/orgs/acme/jobs",
            Some(&token),
            Some(json!({"command": huge})),
        )
        .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    let (status, _) = api
        .call(
            Method::GET,
            "/v1/orgs/acme/jobs?limit=501",
            Some(&token),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
}

#[tokio::test(flavor = "multi_thread")]
async fn idempotency_keys_return_the_same_job_and_refuse_a_different_body() {
    let api = Api::start().await;
    let token = Api::token("acme", Role::Member);
    let send = |body: Value| {
        let request = api
            .client
            .post(format!("{}/v1/orgs/acme/jobs", api.service.url()))
            .bearer_auth(&token)
            .header("Idempotency-Key", "deploy-42")
            .json(&body);
        async move { request.send().await.expect("send") }
    };
    let first = send(json!({"command": "deploy"})).await;
    assert_eq!(first.status(), StatusCode::CREATED);
    let first: Value = first.json().await.expect("json");
    let second = send(json!({"command": "deploy"})).await;
    assert_eq!(second.status(), StatusCode::OK);
    assert_eq!(second.headers()["idempotent-replayed"], "true");
    let second: Value = second.json().await.expect("json");
    assert_eq!(first["id"], second["id"]);
    let different = send(json!({"command": "rollback"})).await;
    assert_eq!(different.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let (_, page) = api
        .call(Method::GET, "/v1/orgs/acme/jobs", Some(&token), None)
        .await;
    assert_eq!(page["items"].as_array().expect("items").len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_batch_is_all_or_nothing() {
    let api = Api::start().await;
    let token = Api::token("acme", Role::Member);
    let mut jobs: Vec<Value> = (0..999)
        .map(|i| json!({"command": format!("echo {i}")}))
        .collect();
    jobs.push(json!({"command": "bad", "priority": -5000}));
    let (status, problem) = api
        .call(
            Method::POST,
            "/v1/orgs/acme/jobs/batch",
            Some(&token),
            Some(json!({"jobs": jobs})),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(problem["errors"][0]["field"], "jobs[999].priority");
    let (_, page) = api
        .call(Method::GET, "/v1/orgs/acme/jobs", Some(&token), None)
        .await;
    assert_eq!(
        page["items"].as_array().expect("items").len(),
        0,
        "nothing was created"
    );

    let jobs: Vec<Value> = (0..1_000)
        .map(|i| json!({"command": format!("echo {i}")}))
        .collect();
    let (status, created) = api
        .call(
            Method::POST,
            "/v1/orgs/acme/jobs/batch",
            Some(&token),
            Some(json!({"jobs": jobs})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(created["jobs"].as_array().expect("jobs").len(), 1_000);
    let too_many: Vec<Value> = (0..1_001).map(|_| json!({"command": "x"})).collect();
    let (status, _) = api
        .call(
            Method::POST,
            "/v1/orgs/acme/jobs/batch",
            Some(&token),
            Some(json!({"jobs": too_many})),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
}

/// A create wakes the scheduler once per request and tells org watchers
/// of each new job, in order; a rejected batch announces nothing. The
/// wake-up goes first (it is on the dispatch path) where Redis keeps the
/// order across channels.
#[tokio::test(flavor = "multi_thread")]
async fn created_jobs_wake_the_scheduler_once_and_reach_org_watchers_in_order() {
    use bus::Channel;
    use domain::events::Event;
    use futures_util::StreamExt;
    let api = Api::start().await;
    let token = Api::token("acme", Role::Member);
    let org = OrgId::parse("acme").expect("org");
    let bus = bus::Bus::connect(&test_support::bus_config(
        api.redis.url(),
        api.redis.prefix(),
    ))
    .expect("bus");
    let mut events = Box::pin(
        bus.subscribe(&[Channel::SchedulerWake, Channel::Org(org)])
            .await
            .expect("subscribe"),
    );
    let (status, single) = api
        .call(
            Method::POST,
            "/v1/orgs/acme/jobs",
            Some(&token),
            Some(json!({"command": "echo one"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, _) = api
        .call(
            Method::POST,
            "/v1/orgs/acme/jobs/batch",
            Some(&token),
            Some(json!({"jobs": [{"command": "ok"}, {"command": "bad", "priority": -5000}]})),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let (status, batch) = api
        .call(
            Method::POST,
            "/v1/orgs/acme/jobs/batch",
            Some(&token),
            Some(json!({"jobs": [{"command": "a"}, {"command": "b"}, {"command": "c"}]})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let mut expected = vec![single["id"].as_str().expect("id").to_owned()];
    expected.extend(
        batch["jobs"]
            .as_array()
            .expect("jobs")
            .iter()
            .map(|j| j["id"].as_str().expect("id").to_owned()),
    );
    let mut created = Vec::new();
    let mut wakes = 0;
    // Everything published for the two accepted requests, then nothing more.
    while let Ok(Some(envelope)) =
        tokio::time::timeout(Duration::from_millis(500), events.next()).await
    {
        match envelope.event {
            Event::JobCreated { job_id, .. } => created.push(job_id.to_string()),
            Event::QueueChanged { .. } => {
                // One pipeline keeps the order across channels; a cluster
                // publishes to each channel's shard on its own.
                if !api.redis.is_cluster() {
                    assert_eq!(
                        created.len(),
                        if wakes == 0 { 0 } else { 1 },
                        "each request's wake-up goes out before its jobs' announcements"
                    );
                }
                wakes += 1;
            }
            other => panic!("unexpected event {other:?}"),
        }
    }
    assert_eq!(created, expected, "every created job, in order, once");
    assert_eq!(wakes, 2, "one wake-up per accepted request");
}

#[tokio::test(flavor = "multi_thread")]
async fn pagination_is_stable_while_jobs_are_added() {
    let api = Api::start().await;
    let token = Api::token("acme", Role::Member);
    let jobs: Vec<Value> = (0..120)
        .map(|i| json!({"command": format!("echo {i}")}))
        .collect();
    let (_, created) = api
        .call(
            Method::POST,
            "/v1/orgs/acme/jobs/batch",
            Some(&token),
            Some(json!({"jobs": jobs})),
        )
        .await;
    let original: std::collections::HashSet<String> = created["jobs"]
        .as_array()
        .expect("jobs")
        .iter()
        .map(|j| j["id"].as_str().expect("id").to_owned())
        .collect();
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        // Someone keeps submitting while we page.
        api.call(
            Method::POST,
            "/v1/orgs/acme/jobs",
            Some(&token),
            Some(json!({"command": "late"})),
        )
        .await;
        let path = match &cursor {
            Some(c) => format!("/v1/orgs/acme/jobs?limit=25&cursor={c}"),
            None => "/v1/orgs/acme/jobs?limit=25".to_owned(),
        };
        let (status, page) = api.call(Method::GET, &path, Some(&token), None).await;
        assert_eq!(status, StatusCode::OK);
        for item in page["items"].as_array().expect("items") {
            seen.push(item["id"].as_str().expect("id").to_owned());
        }
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    let unique: std::collections::HashSet<_> = seen.iter().cloned().collect();
    assert_eq!(unique.len(), seen.len(), "a job appeared on two pages");
    assert!(original.is_subset(&unique), "a job was skipped");
}

#[tokio::test(flavor = "multi_thread")]
async fn auth_is_enforced_and_orgs_are_isolated() {
    let api = Api::start().await;
    let member = Api::token("acme", Role::Member);
    let (_, job) = api
        .call(
            Method::POST,
            "/v1/orgs/acme/jobs",
            Some(&member),
            Some(json!({"command": "x"})),
        )
        .await;
    let id = job["id"].as_str().expect("id").to_owned();

    let response = api
        .client
        .get(format!("{}/v1/orgs/acme/jobs", api.service.url()))
        .send()
        .await
        .expect("send");
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert!(response.headers().contains_key("www-authenticate"));
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );

    let forged = auth::dev::mint_hs256(
        "wrong-secret",
        None,
        "u",
        &[(OrgId::parse("acme").expect("org"), Role::Owner)],
        Duration::from_secs(60),
    );
    let (status, _) = api
        .call(Method::GET, "/v1/orgs/acme/jobs", Some(&forged), None)
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let mut parts: Vec<String> = member.split('.').map(str::to_owned).collect();
    parts[0] = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0".into(); // {"alg":"none","typ":"JWT"}
    let unsigned = format!("{}.{}.", parts[0], parts[1]);
    let (status, _) = api
        .call(Method::GET, "/v1/orgs/acme/jobs", Some(&unsigned), None)
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    let outsider = Api::token("globex", Role::Owner);
    for (method, path) in [
        (Method::GET, format!("/v1/orgs/acme/jobs/{id}")),
        (Method::GET, "/v1/orgs/acme/jobs".to_owned()),
        (Method::POST, format!("/v1/orgs/acme/jobs/{id}/cancel")),
        (Method::GET, format!("/v1/orgs/acme/jobs/{id}/logs")),
        (Method::GET, "/v1/orgs/acme/agents".to_owned()),
        (Method::GET, "/v1/orgs/acme/settings".to_owned()),
        (Method::GET, "/v1/orgs/acme/audit".to_owned()),
        (Method::GET, "/v1/orgs/acme/repositories".to_owned()),
        (Method::GET, "/v1/orgs/acme/dead-letters".to_owned()),
    ] {
        let (status, _) = api.call(method.clone(), &path, Some(&outsider), None).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{method} {path}");
    }
    // Their own org cannot see acme's job either.
    let (status, _) = api
        .call(
            Method::GET,
            &format!("/v1/orgs/globex/jobs/{id}"),
            Some(&outsider),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // Members cannot approve or manage agents; admins can.
    let (status, _) = api
        .call(
            Method::POST,
            "/v1/orgs/acme/registration-tokens",
            Some(&member),
            Some(json!({})),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let admin = Api::token("acme", Role::Admin);
    let (status, created) = api
        .call(
            Method::POST,
            "/v1/orgs/acme/registration-tokens",
            Some(&admin),
            Some(json!({"max_uses": 2})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    assert!(
        created["token"]
            .as_str()
            .expect("token")
            .starts_with("syr_")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn approval_needs_an_admin_and_is_recorded() {
    let api = Api::start().await;
    let member = Api::token("acme", Role::Member);
    let (_, job) = api
        .call(
            Method::POST,
            "/v1/orgs/acme/jobs",
            Some(&member),
            Some(json!({"command": "deploy", "requires_approval": true})),
        )
        .await;
    assert_eq!(job["status"], "pending_approval");
    let id = job["id"].as_str().expect("id").to_owned();
    let (status, _) = api
        .call(
            Method::POST,
            &format!("/v1/orgs/acme/jobs/{id}/approve"),
            Some(&member),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, approved) = api
        .call(
            Method::POST,
            &format!("/v1/orgs/acme/jobs/{id}/approve"),
            Some(&Api::token("acme", Role::Admin)),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(approved["status"], "queued");
    let mut conn = api.db.conn().await;
    #[derive(diesel::QueryableByName)]
    struct Decision {
        #[diesel(sql_type = diesel::sql_types::Text)]
        decided_by: String,
    }
    let decision: Decision = diesel_async::RunQueryDsl::get_result(
        diesel::sql_query("SELECT decided_by FROM approvals WHERE decision = 'approved'"),
        &mut conn,
    )
    .await
    .expect("approval recorded");
    assert_eq!(decision.decided_by, "user:user-1");
}

#[tokio::test(flavor = "multi_thread")]
async fn openapi_and_swagger_ui_are_served_from_the_binary() {
    let api = Api::start().await;
    let (status, doc) = api.call(Method::GET, "/openapi.json", None, None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(doc["openapi"].as_str().expect("version").starts_with("3.1"));
    for path in [
        "/v1/orgs/{org_id}/jobs",
        "/v1/orgs/{org_id}/jobs/{job_id}/cancel",
        "/v1/system",
    ] {
        assert!(
            doc["paths"][path].is_object(),
            "{path} missing from the OpenAPI document"
        );
    }
    let page = api
        .client
        .get(format!("{}/docs/", api.service.url()))
        .send()
        .await
        .expect("docs");
    assert_eq!(page.status(), StatusCode::OK);
    assert!(
        page.text().await.expect("html").contains("swagger"),
        "Swagger UI page"
    );
    let (status, system) = api
        .call(
            Method::GET,
            "/v1/system",
            Some(&Api::token("acme", Role::Member)),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(system["auth_modes"], json!(["hs256"]));
}

/// The backlog's job ids in dispatch order.
async fn queue_order(api: &Api, token: &str) -> Vec<String> {
    let (_, detail) = api
        .call(
            Method::GET,
            "/v1/orgs/acme/queues/backlog",
            Some(token),
            None,
        )
        .await;
    detail["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .map(|e| e["job_id"].as_str().expect("id").to_owned())
        .collect()
}

/// Asks to reorder the backlog; returns the answer's status.
async fn reorder(api: &Api, token: &str, body: Value) -> StatusCode {
    api.call(
        Method::POST,
        "/v1/orgs/acme/queues/backlog/reorder",
        Some(token),
        Some(body),
    )
    .await
    .0
}

#[tokio::test(flavor = "multi_thread")]
async fn queues_show_order_and_reorder_moves_a_job() {
    let api = Api::start().await;
    let member = Api::token("acme", Role::Member);
    let admin = Api::token("acme", Role::Admin);
    let jobs: Vec<Value> = (0..3)
        .map(|i| json!({"command": format!("echo {i}")}))
        .collect();
    let (_, created) = api
        .call(
            Method::POST,
            "/v1/orgs/acme/jobs/batch",
            Some(&member),
            Some(json!({"jobs": jobs})),
        )
        .await;
    let ids: Vec<String> = created["jobs"]
        .as_array()
        .expect("jobs")
        .iter()
        .map(|j| j["id"].as_str().expect("id").to_owned())
        .collect();

    let (status, list) = api
        .call(Method::GET, "/v1/orgs/acme/queues", Some(&member), None)
        .await;
    assert_eq!(status, StatusCode::OK);
    let backlog = list["queues"]
        .as_array()
        .expect("queues")
        .iter()
        .find(|q| q["queue"] == "backlog")
        .expect("backlog")
        .clone();
    assert_eq!(backlog["queued"], 3);

    let by = |a: usize, b: usize, c: usize| vec![ids[a].clone(), ids[b].clone(), ids[c].clone()];

    assert_eq!(queue_order(&api, &member).await, ids);
    let (_, detail) = api
        .call(
            Method::GET,
            "/v1/orgs/acme/queues/backlog",
            Some(&member),
            None,
        )
        .await;
    assert_eq!(detail["entries"][0]["position"], 1);
    assert_eq!(
        reorder(&api, &member, json!({"job_id": ids[2], "before": ids[0]})).await,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        reorder(&api, &admin, json!({"job_id": ids[2], "before": ids[0]})).await,
        StatusCode::OK
    );
    assert_eq!(queue_order(&api, &member).await, by(2, 0, 1));
    assert_eq!(
        reorder(&api, &admin, json!({"job_id": ids[0], "after": ids[1]})).await,
        StatusCode::OK
    );
    assert_eq!(queue_order(&api, &member).await, by(2, 1, 0));
    assert_eq!(
        reorder(&api, &admin, json!({"job_id": ids[0], "position": 1})).await,
        StatusCode::OK
    );
    assert_eq!(queue_order(&api, &member).await, by(0, 2, 1));
    assert_eq!(
        reorder(&api, &admin, json!({"job_id": ids[0], "position": 99})).await,
        StatusCode::OK,
        "past the end means last"
    );
    assert_eq!(queue_order(&api, &member).await, by(2, 1, 0));

    // The job's own page agrees with the queue's order.
    let (_, job) = api
        .call(
            Method::GET,
            &format!("/v1/orgs/acme/jobs/{}", ids[0]),
            Some(&member),
            None,
        )
        .await;
    assert_eq!(job["queue_position"], 3);

    let (status, stats) = api
        .call(
            Method::GET,
            "/v1/orgs/acme/stats?window=1h",
            Some(&member),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(stats["jobs"]["created"], 3);
    let (status, _) = api
        .call(
            Method::GET,
            "/v1/orgs/acme/stats?window=forever",
            Some(&member),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
}

#[tokio::test(flavor = "multi_thread")]
async fn request_ids_are_returned_and_recorded_in_the_audit_trail() {
    let api = Api::start().await;
    let token = Api::token("acme", Role::Member);
    let response = api
        .client
        .post(format!("{}/v1/orgs/acme/jobs", api.service.url()))
        .bearer_auth(&token)
        .header("X-Request-ID", "trace-me-42")
        .json(&json!({"command": "echo"}))
        .send()
        .await
        .expect("send");
    assert_eq!(response.headers()["x-request-id"], "trace-me-42");
    let (_, audit) = api
        .call(Method::GET, "/v1/orgs/acme/audit", Some(&token), None)
        .await;
    assert_eq!(audit["items"][0]["request_id"], "trace-me-42");
    // Without one, the server makes one up.
    let generated = api
        .client
        .get(format!("{}/v1/orgs/acme/jobs", api.service.url()))
        .bearer_auth(&token)
        .send()
        .await
        .expect("send");
    assert!(!generated.headers()["x-request-id"].is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_creates_each_get_their_own_job_and_audit_event_and_a_refused_one_fails_alone() {
    let api = Api::start().await;
    let token = Api::token("acme", Role::Member);
    // The first create reads the org's settings; the next ones are written
    // together with whatever else arrives meanwhile.
    let (status, _) = api
        .call(
            Method::POST,
            "/v1/orgs/acme/jobs",
            Some(&token),
            Some(json!({"command": "echo first"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let unknown_repository = uuid::Uuid::new_v4();
    let requests = (0..40).map(|i| {
        let body = if i == 17 {
            json!({"command": "echo refused", "repository_id": unknown_repository})
        } else {
            json!({"command": format!("echo {i}")})
        };
        let request = api
            .client
            .post(format!("{}/v1/orgs/acme/jobs", api.service.url()))
            .bearer_auth(&token)
            .header("X-Request-ID", format!("concurrent-{i}"))
            .json(&body);
        async move {
            let response = request.send().await.expect("send");
            let status = response.status();
            let body: Value = response.json().await.expect("body");
            (i, status, body)
        }
    });
    let answers = futures_util::future::join_all(requests).await;

    let mut created = std::collections::HashSet::new();
    for (i, status, body) in answers {
        if i == 17 {
            assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
            assert_eq!(body["errors"][0]["field"], "repository_id", "{body}");
            continue;
        }
        assert_eq!(status, StatusCode::CREATED, "request {i}: {body}");
        assert_eq!(
            body["command"],
            format!("echo {i}"),
            "each gets its own job"
        );
        assert!(created.insert(body["id"].as_str().expect("id").to_owned()));
    }
    assert_eq!(created.len(), 39);
    let (_, listed) = api
        .call(
            Method::GET,
            "/v1/orgs/acme/jobs?limit=100",
            Some(&token),
            None,
        )
        .await;
    assert_eq!(listed["items"].as_array().expect("items").len(), 40);
    let (_, audit) = api
        .call(
            Method::GET,
            "/v1/orgs/acme/audit?limit=100",
            Some(&token),
            None,
        )
        .await;
    let mut audited = std::collections::HashMap::new();
    for event in audit["items"].as_array().expect("items") {
        if event["action"] == "job.created" {
            audited.insert(
                event["request_id"].as_str().unwrap_or_default().to_owned(),
                event["target_id"].as_str().expect("target").to_owned(),
            );
        }
    }
    assert_eq!(
        audited.len(),
        40,
        "one event per accepted request: {audited:?}"
    );
    assert!(!audited.contains_key("concurrent-17"));
    assert!(
        audited
            .iter()
            .filter(|(request, _)| request.starts_with("concurrent-"))
            .all(|(_, target)| created.contains(target)),
        "each event names its own request's job"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn orgs_settings_and_repositories_round_trip() {
    let api = Api::start().await;
    let admin = Api::token("acme", Role::Admin);
    let (status, orgs) = api.call(Method::GET, "/v1/orgs", Some(&admin), None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(orgs["orgs"][0]["org_id"], "acme");
    assert_eq!(orgs["orgs"][0]["role"], "Admin");

    let (_, settings) = api
        .call(Method::GET, "/v1/orgs/acme/settings", Some(&admin), None)
        .await;
    assert_eq!(settings["default_queue"], "backlog");
    assert_eq!(settings["queue_precedence"], json!(["rework", "backlog"]));
    let (status, changed) = api
        .call(
            Method::PATCH,
            "/v1/orgs/acme/settings",
            Some(&admin),
            Some(json!({"max_concurrent_jobs": 5, "approval_policy": "always"})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{changed}");
    let (_, job) = api
        .call(
            Method::POST,
            "/v1/orgs/acme/jobs",
            Some(&admin),
            Some(json!({"command": "x"})),
        )
        .await;
    assert_eq!(
        job["status"], "pending_approval",
        "the always policy gates every job"
    );
    let (_, cleared) = api
        .call(
            Method::PATCH,
            "/v1/orgs/acme/settings",
            Some(&admin),
            Some(json!({"max_concurrent_jobs": null})),
        )
        .await;
    assert_eq!(cleared["max_concurrent_jobs"], Value::Null);
    assert_eq!(
        cleared["approval_policy"], "always",
        "fields not sent are kept"
    );

    let (status, repo) = api
        .call(
            Method::POST,
            "/v1/orgs/acme/repositories",
            Some(&admin),
            Some(json!({"name": "api", "max_concurrent_jobs": 2})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let id = repo["id"].as_str().expect("id").to_owned();
    let (status, _) = api
        .call(
            Method::POST,
            "/v1/orgs/acme/repositories",
            Some(&admin),
            Some(json!({"name": "api"})),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "names are unique per org");
    let (status, updated) = api
        .call(
            Method::PATCH,
            &format!("/v1/orgs/acme/repositories/{id}"),
            Some(&admin),
            Some(json!({"name": "api-v2"})),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(updated["name"], "api-v2");
    let (_, list) = api
        .call(
            Method::GET,
            "/v1/orgs/acme/repositories",
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(list["repositories"].as_array().expect("list").len(), 1);
    let (status, _) = api
        .call(
            Method::POST,
            "/v1/orgs/acme/jobs",
            Some(&admin),
            Some(json!({"command": "x", "repository_id": id})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, _) = api
        .call(
            Method::DELETE,
            &format!("/v1/orgs/acme/repositories/{id}"),
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, problem) = api
        .call(
            Method::POST,
            "/v1/orgs/acme/jobs",
            Some(&admin),
            Some(json!({"command": "x", "repository_id": id})),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{problem}");
    assert!(
        problem.to_string().contains("repository_id"),
        "names the field: {problem}"
    );
    let (status, _) = api
        .call(
            Method::GET,
            &format!("/v1/orgs/acme/repositories/{id}"),
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread")]
async fn agents_can_be_listed_drained_and_revoked() {
    let api = Api::start().await;
    let admin = Api::token("acme", Role::Admin);
    let (_, created) = api
        .call(
            Method::POST,
            "/v1/orgs/acme/registration-tokens",
            Some(&admin),
            Some(json!({"labels": ["gpu"]})),
        )
        .await;
    let mut conn = api.db.conn().await;
    let agent = db::agents::register(
        &mut conn,
        created["token"].as_str().expect("token"),
        &domain::agent::AgentProfile {
            name: "runner".into(),
            labels: domain::job::Labels::new(["linux"]),
            capacity: 2,
            version: "1".into(),
        },
    )
    .await
    .expect("db")
    .expect("registered");
    let id = agent.agent.id;
    let (_, list) = api
        .call(Method::GET, "/v1/orgs/acme/agents", Some(&admin), None)
        .await;
    assert_eq!(list["agents"][0]["labels"], json!(["gpu", "linux"]));
    assert_eq!(list["agents"][0]["status"], "offline");
    let (status, drained) = api
        .call(
            Method::POST,
            &format!("/v1/orgs/acme/agents/{id}/drain"),
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(drained["status"], "draining");
    let (status, _) = api
        .call(
            Method::DELETE,
            &format!("/v1/orgs/acme/agents/{id}"),
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (_, shown) = api
        .call(
            Method::GET,
            &format!("/v1/orgs/acme/agents/{id}"),
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(shown["status"], "revoked");
    assert!(
        db::agents::authenticate(&mut conn, &agent.secret)
            .await
            .expect("db")
            .is_none(),
        "the credential no longer works"
    );
    let (_, audit) = api
        .call(Method::GET, "/v1/orgs/acme/audit", Some(&admin), None)
        .await;
    let actions: Vec<&str> = audit["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter_map(|e| e["action"].as_str())
        .collect();
    assert_eq!(
        actions,
        [
            "agent.revoked",
            "agent.drained",
            "agent.registered",
            "registration_token.created"
        ]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn dead_letters_are_listed_and_redriven() {
    let api = Api::start().await;
    let member = Api::token("acme", Role::Member);
    let (_, job) = api
        .call(
            Method::POST,
            "/v1/orgs/acme/jobs",
            Some(&member),
            Some(json!({"command": "false", "retry_policy": {"maximum_attempts": 1}})),
        )
        .await;
    let id: domain::JobId = job["id"].as_str().expect("id").parse().expect("uuid");
    let mut conn = api.db.conn().await;
    let lease = db::leases::lease_job(
        &mut conn,
        id,
        domain::AgentId::new(),
        Duration::from_secs(10),
    )
    .await
    .expect("lease");
    db::leases::start(&mut conn, id, lease.epoch as u64, Duration::from_secs(30))
        .await
        .expect("start");
    let ending = db::leases::Ending::Failed {
        exit_code: Some(1),
        error_kind: None,
        message: None,
    };
    db::leases::end_attempt(&mut conn, id, Some(lease.epoch as u64), ending)
        .await
        .expect("fail");

    let (status, dead) = api
        .call(
            Method::GET,
            "/v1/orgs/acme/dead-letters",
            Some(&member),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(dead["items"][0]["id"], job["id"]);
    assert_eq!(dead["items"][0]["status"], "dead");
    let (status, redriven) = api
        .call(
            Method::POST,
            &format!("/v1/orgs/acme/dead-letters/{id}/redrive"),
            Some(&member),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(redriven["status"], "queued");
    let (_, dead) = api
        .call(
            Method::GET,
            "/v1/orgs/acme/dead-letters",
            Some(&member),
            None,
        )
        .await;
    assert!(dead["items"].as_array().expect("items").is_empty());
    let (status, _) = api
        .call(
            Method::POST,
            &format!("/v1/orgs/acme/dead-letters/{id}/redrive"),
            Some(&member),
            None,
        )
        .await;
    assert_eq!(
        status,
        StatusCode::CONFLICT,
        "a queued job is not a dead letter"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_dashboards_origin_may_call_the_api_and_others_may_not() {
    let api = Api::start().await;
    let preflight = |origin: &str| {
        api.client
            .request(
                Method::OPTIONS,
                format!("{}/v1/orgs/acme/jobs", api.service.url()),
            )
            .header("Origin", origin)
            .header("Access-Control-Request-Method", "POST")
            .header(
                "Access-Control-Request-Headers",
                "authorization,content-type",
            )
            .send()
    };
    let allowed = preflight("http://127.0.0.1:8090").await.expect("preflight");
    assert!(
        allowed.status().is_success(),
        "{:?} {:?}",
        allowed.status(),
        allowed.headers()
    );
    assert_eq!(
        allowed.headers()["access-control-allow-origin"],
        "http://127.0.0.1:8090"
    );
    let allowed_headers = allowed.headers()["access-control-allow-headers"]
        .to_str()
        .expect("ascii")
        .to_lowercase();
    assert!(
        allowed_headers.contains("authorization"),
        "{allowed_headers}"
    );
    let refused = preflight("https://evil.example").await.expect("preflight");
    assert!(
        !refused
            .headers()
            .contains_key("access-control-allow-origin")
    );
}

/// A replica keeps the settings it read for its next creates; a change made
/// through another replica applies to its very next create all the same.
#[tokio::test(flavor = "multi_thread")]
async fn a_settings_change_on_one_replica_applies_to_the_next_create_on_another() {
    let api = Api::start().await;
    let other = api.another_replica();
    let admin = Api::token("acme", Role::Admin);
    let queue_of_new_job = || async {
        let (status, job) = api
            .call(
                Method::POST,
                "/v1/orgs/acme/jobs",
                Some(&admin),
                Some(json!({"command": "x"})),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{job}");
        job["queue"].as_str().expect("queue").to_owned()
    };
    assert_eq!(queue_of_new_job().await, "backlog");
    assert_eq!(queue_of_new_job().await, "backlog", "from the cache");

    let change_on_other = |patch: Value| {
        let request = api
            .client
            .patch(format!("{}/v1/orgs/acme/settings", other.url()))
            .bearer_auth(&admin)
            .json(&patch);
        async move {
            let changed = request.send().await.expect("patch");
            assert_eq!(changed.status(), StatusCode::OK);
        }
    };
    change_on_other(json!({"default_queue": "rework"})).await;
    assert_eq!(
        queue_of_new_job().await,
        "rework",
        "the change is seen at once"
    );
    assert_eq!(queue_of_new_job().await, "rework");

    change_on_other(json!({"approval_policy": "always"})).await;
    let (_, job) = api
        .call(
            Method::POST,
            "/v1/orgs/acme/jobs",
            Some(&admin),
            Some(json!({"command": "x"})),
        )
        .await;
    assert_eq!(job["status"], "pending_approval");
    let (_, list) = api
        .call(
            Method::GET,
            "/v1/orgs/acme/jobs?limit=100",
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(
        list["items"].as_array().expect("items").len(),
        5,
        "a create retried with fresh settings is made once"
    );
}
