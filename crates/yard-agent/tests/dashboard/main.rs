//! `deploy/grafana/switchyard.json` cannot silently rot: every metric its
//! queries name is exported by one of the services, as scraped from the
//! four of them running in-process. (This crate's tests are where every
//! service runs together.)

#[path = "../common/services.rs"]
mod services;

use std::collections::{BTreeSet, HashMap};
use std::net::TcpListener;
use std::time::Duration;

use test_support::{TestDb, TestRedis, common_config};
use tokio_util::sync::CancellationToken;

const SECRET: &str = "dashboard-test-secret";

/// Metric families in Prometheus text output, with their types.
fn families(text: &str) -> HashMap<String, String> {
    text.lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|rest| {
            let (name, kind) = rest.split_once(' ')?;
            Some((name.to_owned(), kind.to_owned()))
        })
        .collect()
}

/// Every `switchyard_*` metric name a PromQL expression mentions.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(start) = rest.find("switchyard_") {
        let tail = &rest[start..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.push(tail[..end].to_owned());
        rest = &tail[end..];
    }
    names
}

/// Whether `name` is exported: a family, or a histogram's series.
fn exported(name: &str, families: &HashMap<String, String>) -> bool {
    families.contains_key(name)
        || ["_bucket", "_sum", "_count"].iter().any(|suffix| {
            name.strip_suffix(suffix)
                .is_some_and(|family| families.get(family).is_some_and(|t| t == "histogram"))
        })
}

async fn scrape(base: &str) -> String {
    reqwest::get(format!("{base}/metrics"))
        .await
        .expect("scrape")
        .text()
        .await
        .expect("body")
}

#[test]
fn metric_names_are_read_from_queries() {
    assert_eq!(
        metric_names(
            r#"histogram_quantile(0.95, sum by (le) (rate(switchyard_a_seconds_bucket{x="1"}[5m]))) / switchyard_b"#
        ),
        ["switchyard_a_seconds_bucket", "switchyard_b"]
    );
    let families = HashMap::from([("switchyard_a_seconds".to_owned(), "histogram".to_owned())]);
    assert!(exported("switchyard_a_seconds_bucket", &families));
    assert!(!exported("switchyard_a_seconds_total", &families));
}

#[tokio::test(flavor = "multi_thread")]
async fn every_metric_the_dashboard_queries_is_exported_by_a_service() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../deploy/grafana/switchyard.json"
    );
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("dashboard file"))
            .expect("the dashboard is JSON");
    let variables = dashboard["templating"]["list"]
        .as_array()
        .expect("variables");
    assert!(
        variables.iter().any(|v| v["name"] == "datasource"
            && v["type"] == "datasource"
            && v["query"] == "prometheus"),
        "a Prometheus data source variable"
    );
    let mut queried: BTreeSet<String> = BTreeSet::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        if panel["type"] == "row" {
            continue;
        }
        assert_eq!(
            panel["datasource"]["uid"], "${datasource}",
            "{}",
            panel["title"]
        );
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{} has queries", panel["title"]);
        for target in targets {
            let names = metric_names(target["expr"].as_str().expect("expr"));
            assert!(!names.is_empty(), "{} queries a metric", panel["title"]);
            queried.extend(names);
        }
    }

    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let auth = services::hs256(SECRET);
    let api = services::job_api(&db, &redis, auth.clone());
    let scheduler = services::scheduler(
        &db,
        &redis,
        scheduler::Settings {
            sweep_interval: Duration::from_millis(100),
            ..scheduler::Settings::default()
        },
    );
    let broadcaster = services::broadcaster(&db, &redis, auth);
    let gateway_stop = CancellationToken::new();
    let gateway_http = {
        let lookup = |_: &str| -> Option<String> { None };
        let config = agent_gateway::Config::from_parts(
            common_config(agent_gateway::SERVICE, &db, redis.url(), redis.prefix()),
            &lookup,
        )
        .expect("gateway config");
        let grpc = TcpListener::bind("127.0.0.1:0").expect("bind");
        let http = TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = format!("http://{}", http.local_addr().expect("addr"));
        tokio::spawn(agent_gateway::run(
            config,
            agent_gateway::Listeners { grpc, http },
            gateway_stop.clone(),
        ));
        url
    };

    // A job no agent can take stays queued, so the queue depth is exported.
    let member = auth::dev::mint_hs256(
        SECRET,
        None,
        "user-1",
        &[(
            domain::OrgId::parse("acme").expect("org"),
            auth::Role::Member,
        )],
        Duration::from_secs(600),
    );
    let created = reqwest::Client::new()
        .post(format!("{}/v1/orgs/acme/jobs", api.url()))
        .bearer_auth(&member)
        .json(&serde_json::json!({"command": "true", "labels": ["nowhere"]}))
        .send()
        .await
        .expect("create");
    assert_eq!(created.status(), reqwest::StatusCode::CREATED);

    let bases = [api.url(), scheduler.url(), broadcaster.url(), gateway_http];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let mut all: HashMap<String, String> = HashMap::new();
        for base in &bases {
            // Twice: the first scrape itself makes the HTTP series exist.
            scrape(base).await;
            all.extend(families(&scrape(base).await));
        }
        let missing: Vec<&String> = queried.iter().filter(|n| !exported(n, &all)).collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the dashboard queries metrics no service exports: {missing:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(queried.len() >= 15, "{queried:?}");
    gateway_stop.cancel();
}
