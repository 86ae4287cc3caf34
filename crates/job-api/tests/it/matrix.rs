//! The auth matrix and org isolation, walked over every operation listed in
//! `/openapi.json` (a route added later is covered without editing this).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use auth::Role;
use domain::OrgId;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use test_support::{TestDb, TestRedis, common_config, spawn_service};

const SECRET: &str = "matrix-secret";
const ISSUER: &str = "switchyard-test";

fn mint(org: &str, role: Role, issuer: &str, secret: &str) -> String {
    auth::dev::mint_hs256(
        secret,
        Some(issuer),
        "matrix-user",
        &[(OrgId::parse(org).expect("org"), role)],
        Duration::from_secs(600),
    )
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

fn claims(exp: u64) -> Value {
    json!({
        "iss": ISSUER, "exp": exp, "iat": now(), "user_id": "matrix-user",
        "org_id_to_org_member_info": {"acme": {"org_id": "acme", "org_name": "Acme", "user_role": "Owner",
            "inherited_user_roles_plus_current_role": ["Owner", "Admin", "Member"], "user_permissions": []}}
    })
}

/// Tokens that must all be refused with 401.
fn bad_tokens() -> Vec<(&'static str, String)> {
    let b64 = |v: &Value| {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    let hs = |c: &Value, secret: &str| {
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            c,
            &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
        )
        .expect("sign")
    };
    let rsa_pem = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../auth/tests/fixtures/test_only_rsa1_private.pem"
    ))
    .expect("test key");
    let rs256 = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256),
        &claims(now() + 600),
        &jsonwebtoken::EncodingKey::from_rsa_pem(&rsa_pem).expect("rsa key"),
    )
    .expect("sign");
    let none = format!(
        "{}.{}.",
        b64(&json!({"alg": "none", "typ": "JWT"})),
        b64(&claims(now() + 600))
    );
    vec![
        ("bad signature", hs(&claims(now() + 600), "not-the-secret")),
        ("alg none", none),
        ("RS256 where only HS256 is trusted", rs256),
        ("expired", hs(&claims(now() - 3_600), SECRET)),
        (
            "wrong issuer",
            mint("acme", Role::Owner, "someone-else", SECRET),
        ),
        ("garbage", "not.a.jwt".to_owned()),
    ]
}

/// Operations whose role requirement is above Member.
const ADMIN_ONLY: &[(&str, &str)] = &[
    ("PATCH", "/v1/orgs/{org_id}/settings"),
    ("POST", "/v1/orgs/{org_id}/repositories"),
    ("PATCH", "/v1/orgs/{org_id}/repositories/{repository_id}"),
    ("DELETE", "/v1/orgs/{org_id}/repositories/{repository_id}"),
    ("POST", "/v1/orgs/{org_id}/registration-tokens"),
    ("POST", "/v1/orgs/{org_id}/agents/{agent_id}/drain"),
    ("DELETE", "/v1/orgs/{org_id}/agents/{agent_id}"),
    ("POST", "/v1/orgs/{org_id}/jobs/{job_id}/approve"),
    ("POST", "/v1/orgs/{org_id}/jobs/{job_id}/reject"),
    ("POST", "/v1/orgs/{org_id}/queues/{queue}/reorder"),
];

#[tokio::test(flavor = "multi_thread")]
async fn every_route_enforces_auth_roles_and_org_isolation() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let config = job_api::Config {
        common: common_config(job_api::SERVICE, &db, redis.url(), redis.prefix()),
        addr: "127.0.0.1:0".parse().expect("addr"),
        auth: auth::AuthConfig {
            hs256_secret: Some(SECRET.into()),
            issuer: Some(ISSUER.into()),
            ..auth::AuthConfig::default()
        },
        cancel_grace: Duration::from_secs(30),
        cors_origins: vec!["http://127.0.0.1:8090".into()],
        lease_on_create: Some(Duration::from_secs(10)),
    };
    let service = spawn_service(move |listener, shutdown| job_api::run(config, listener, shutdown));
    let base = service.url();
    let client = reqwest::Client::new();
    let owner = mint("acme", Role::Owner, ISSUER, SECRET);

    // Real resources of acme so that every path names something that exists.
    let post = |path: String, body: Value| {
        let request = client
            .post(format!("{base}{path}"))
            .bearer_auth(&owner)
            .json(&body);
        async move {
            request
                .send()
                .await
                .expect("send")
                .json::<Value>()
                .await
                .expect("json")
        }
    };
    let job = post("/v1/orgs/acme/jobs".into(), json!({"command": "x"})).await["id"]
        .as_str()
        .expect("job")
        .to_owned();
    let repo = post("/v1/orgs/acme/repositories".into(), json!({"name": "api"})).await["id"]
        .as_str()
        .expect("repo")
        .to_owned();
    let token = post("/v1/orgs/acme/registration-tokens".into(), json!({})).await["token"]
        .as_str()
        .expect("token")
        .to_owned();
    let mut conn = db.conn().await;
    let agent = db::agents::register(
        &mut conn,
        &token,
        &domain::agent::AgentProfile {
            name: "a".into(),
            labels: domain::job::Labels::default(),
            capacity: 1,
            version: "t".into(),
        },
    )
    .await
    .expect("db")
    .expect("registered")
    .agent
    .id
    .to_string();

    let doc: Value = client
        .get(format!("{base}/openapi.json"))
        .send()
        .await
        .expect("doc")
        .json()
        .await
        .expect("json");
    let mut operations = Vec::new();
    for (template, item) in doc["paths"].as_object().expect("paths") {
        for method in item.as_object().expect("methods").keys() {
            let path = template
                .replace("{org_id}", "acme")
                .replace("{job_id}", &job)
                .replace("{repository_id}", &repo)
                .replace("{agent_id}", &agent)
                .replace("{queue}", "backlog");
            operations.push((method.to_uppercase(), template.clone(), path));
        }
    }
    assert!(
        operations.len() >= 30,
        "only {} operations documented",
        operations.len()
    );

    let bad = bad_tokens();
    let outsider = mint("globex", Role::Owner, ISSUER, SECRET);
    let member = mint("acme", Role::Member, ISSUER, SECRET);
    let send = |method: &str, path: &str, token: Option<&str>| {
        let mut request = client
            .request(
                Method::from_bytes(method.as_bytes()).expect("method"),
                format!("{base}{path}"),
            )
            .json(&json!({}));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        async move { request.send().await.expect("send") }
    };
    for (method, template, path) in &operations {
        let response = send(method, path, None).await;
        assert_eq!(
            response.status(),
            StatusCode::UNAUTHORIZED,
            "{method} {template} without a token"
        );
        assert!(
            response.headers().contains_key("www-authenticate"),
            "{method} {template}"
        );
        for (what, token) in &bad {
            let status = send(method, path, Some(token)).await.status();
            assert_eq!(
                status,
                StatusCode::UNAUTHORIZED,
                "{method} {template} with {what}"
            );
        }
        if template.starts_with("/v1/orgs/{org_id}") {
            let status = send(method, path, Some(&outsider)).await.status();
            assert_eq!(
                status,
                StatusCode::NOT_FOUND,
                "{method} {template} by another org's owner"
            );
        }
        if ADMIN_ONLY.contains(&(method.as_str(), template.as_str())) {
            let status = send(method, path, Some(&member)).await.status();
            assert_eq!(
                status,
                StatusCode::FORBIDDEN,
                "{method} {template} by a member"
            );
        }
    }
    // The documented admin-only list names real operations.
    for (method, template) in ADMIN_ONLY {
        assert!(
            operations
                .iter()
                .any(|(m, t, _)| m == method && t == template),
            "{method} {template} is not documented"
        );
    }
    service.stop().await.expect("stop");
}
