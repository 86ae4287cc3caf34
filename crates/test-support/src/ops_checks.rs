//! The checks every service's `/healthz`, `/readyz`, `/version` and
//! `/metrics` must pass, shared so each service's test is a few lines.

use std::time::{Duration, Instant};

/// `/healthz` and `/readyz` answer 200 with both dependencies up,
/// `/version` names the service, `/metrics` counts requests by route.
pub async fn check_operational_endpoints(base_url: &str, service: &str, version: &str) {
    let client = reqwest::Client::new();
    let get = |path: &str| client.get(format!("{base_url}{path}")).send();

    assert_eq!(get("/healthz").await.expect("healthz").status(), 200);

    let ready = get("/readyz").await.expect("readyz");
    assert_eq!(ready.status(), 200);
    let body: serde_json::Value = ready.json().await.expect("json");
    assert_eq!(body["checks"]["postgres"], "ok");
    assert_eq!(body["checks"]["redis"], "ok");

    let about: serde_json::Value = get("/version")
        .await
        .expect("version")
        .json()
        .await
        .expect("json");
    assert_eq!(about["name"], service);
    assert_eq!(about["version"], version);

    let metrics = get("/metrics").await.expect("metrics");
    assert_eq!(metrics.status(), 200);
    let text = metrics.text().await.expect("text");
    assert!(text.contains("switchyard_http_requests_total"), "{text}");
    assert!(
        text.contains("route=\"/readyz\""),
        "request metrics carry the route: {text}"
    );
    assert!(text.contains("switchyard_db_pool_connections_max"));
}

/// With Redis stopped `/readyz` answers 503 within two seconds (PostgreSQL
/// still reported ok), and 200 again once Redis is back, with no restart.
pub async fn check_readiness_follows_redis(base_url: &str, redis: &mut crate::RedisServer) {
    let client = reqwest::Client::new();
    let readyz = format!("{base_url}/readyz");
    assert_eq!(
        client.get(&readyz).send().await.expect("readyz").status(),
        200
    );

    redis.stop();
    let asked = Instant::now();
    let down = client.get(&readyz).send().await.expect("readyz");
    assert_eq!(down.status(), 503);
    assert!(
        asked.elapsed() < Duration::from_secs(2),
        "took {:?}",
        asked.elapsed()
    );
    let body: serde_json::Value = down.json().await.expect("json");
    assert_eq!(body["checks"]["postgres"], "ok");
    assert_ne!(body["checks"]["redis"], "ok");

    redis.restart();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = client.get(&readyz).send().await.expect("readyz").status();
        if status == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still {status} after Redis came back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
