//! The shared HTTP server: deadlines, graceful shutdown, metrics.

use std::time::{Duration, Instant};

use actix_web::{HttpResponse, web};
use service_kit::config::HttpConfig;
use service_kit::ops::Ops;
use test_support::spawn_service;

fn http_config(request_timeout: Duration) -> HttpConfig {
    HttpConfig {
        request_timeout,
        shutdown_timeout: Duration::from_secs(5),
        workers: 1,
        ..HttpConfig::default()
    }
}

async fn slow(delay: web::Path<u64>) -> HttpResponse {
    tokio::time::sleep(Duration::from_millis(*delay)).await;
    HttpResponse::Ok().body("done")
}

fn serve_slow(request_timeout: Duration) -> test_support::RunningService {
    let config = http_config(request_timeout);
    spawn_service(move |listener, shutdown| async move {
        let ops = Ops::new("test", "0.0.0", Vec::new());
        service_kit::http::serve(listener, &config, ops, shutdown, |cfg| {
            cfg.route("/slow/{ms}", web::get().to(slow));
        })
        .await?;
        Ok(())
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn a_handler_past_its_deadline_gets_a_problem_503() {
    let service = serve_slow(Duration::from_millis(300));
    let client = reqwest::Client::new();
    let started = Instant::now();
    let response = client
        .get(format!("{}/slow/5000", service.url()))
        .send()
        .await
        .expect("send");
    assert_eq!(response.status(), 503);
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(
        response.headers()["content-type"].to_str().expect("ascii"),
        "application/problem+json"
    );
    let problem: serde_json::Value = response.json().await.expect("json");
    assert_eq!(problem["status"], 503);
    assert_eq!(
        problem["type"],
        "https://switchyard.dev/problems/request-timeout"
    );

    let fast = client
        .get(format!("{}/slow/10", service.url()))
        .send()
        .await
        .expect("send");
    assert_eq!(fast.status(), 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn shutdown_lets_in_flight_requests_finish_then_stops_accepting() {
    let service = serve_slow(Duration::from_secs(30));
    let url = service.url();
    let client = reqwest::Client::new();
    let in_flight = tokio::spawn({
        let client = client.clone();
        let url = url.clone();
        async move { client.get(format!("{url}/slow/800")).send().await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    service.stop().await.expect("clean exit");
    let response = in_flight
        .await
        .expect("join")
        .expect("in-flight request answered");
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.expect("body"), "done");
    let fresh = reqwest::Client::new()
        .get(format!("{url}/healthz"))
        .send()
        .await;
    assert!(
        fresh.is_err(),
        "a stopped server must refuse new connections"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn requests_are_counted_by_route_pattern() {
    let service = serve_slow(Duration::from_secs(30));
    let client = reqwest::Client::new();
    for ms in [1, 2, 3] {
        client
            .get(format!("{}/slow/{ms}", service.url()))
            .send()
            .await
            .expect("send");
    }
    let text = client
        .get(format!("{}/metrics", service.url()))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    let line = text
        .lines()
        .find(|l| {
            l.starts_with("switchyard_http_requests_total") && l.contains("route=\"/slow/{ms}\"")
        })
        .unwrap_or_else(|| panic!("no per-route counter in {text}"));
    assert!(line.ends_with(" 3"), "{line}");
}
