//! `yard` as a user runs it: the real binary, its stdout, stderr and exit
//! code; tokens checked with `auth::Verifier`.

use std::process::{Command, Output};
use std::time::{SystemTime, UNIX_EPOCH};

use auth::{AuthConfig, Role, Verifier};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use domain::OrgId;
use serde_json::Value;

const SECRET: &str = "test-only-yard-secret";

/// Runs `yard` with exactly the given `AUTH_*` variables.
fn yard(env: &[(&str, &str)], args: &[&str]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_yard"));
    for name in auth::config::VARIABLES {
        command.env_remove(name);
    }
    command.envs(env.iter().copied()).args(args);
    command.output().expect("run yard")
}

fn stdout(output: &Output) -> String {
    String::from_utf8(output.stdout.clone()).expect("utf-8")
}

fn stderr(output: &Output) -> String {
    String::from_utf8(output.stderr.clone()).expect("utf-8")
}

fn verifier(issuer: Option<&str>) -> Verifier {
    Verifier::new(AuthConfig {
        hs256_secret: Some(SECRET.into()),
        issuer: issuer.map(str::to_owned),
        ..AuthConfig::default()
    })
    .expect("verifier")
}

/// The (already verified) token's claims, to look at `exp`.
fn claims(token: &str) -> Value {
    let payload = token.split('.').nth(1).expect("payload");
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).expect("base64")).expect("json")
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64
}

fn org(id: &str) -> OrgId {
    OrgId::parse(id).expect("org")
}

#[tokio::test(flavor = "multi_thread")]
async fn dev_token_prints_only_a_token_the_verifier_accepts() {
    let output = yard(
        &[("AUTH_HS256_SECRET", SECRET)],
        &["dev-token", "--org", "acme"],
    );
    assert!(output.status.success(), "{}", stderr(&output));
    let printed = stdout(&output);
    assert_eq!(printed.lines().count(), 1, "one line: {printed:?}");
    let token = printed.trim_end();
    assert_eq!(token.split('.').count(), 3);

    let principal = verifier(None).verify(token).await.expect("valid");
    assert_eq!(principal.user_id, "dev-user");
    assert_eq!(principal.orgs.len(), 1);
    assert_eq!(
        principal.membership(&org("acme")).expect("member").role,
        Role::Owner
    );
    let lifetime = claims(token)["exp"].as_i64().expect("exp") - now();
    assert!(
        (720 * 3600 - 60..=720 * 3600).contains(&lifetime),
        "{lifetime}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn dev_token_honours_role_user_ttl_and_issuer() {
    let issuer = "https://auth.example.com";
    let output = yard(
        &[("AUTH_HS256_SECRET", SECRET), ("AUTH_ISSUER", issuer)],
        &[
            "dev-token",
            "--org",
            "acme",
            "--org",
            "globex",
            "--role",
            "Admin",
            "--user",
            "alice",
            "--ttl-hours",
            "2",
        ],
    );
    assert!(output.status.success(), "{}", stderr(&output));
    let token = stdout(&output);
    let token = token.trim_end();

    let principal = verifier(Some(issuer)).verify(token).await.expect("valid");
    assert_eq!(principal.user_id, "alice");
    for id in ["acme", "globex"] {
        let membership = principal.membership(&org(id)).expect("member");
        assert_eq!(membership.role, Role::Admin);
        assert!(!membership.is_at_least(Role::Owner));
    }
    assert_eq!(claims(token)["iss"], issuer);
    let lifetime = claims(token)["exp"].as_i64().expect("exp") - now();
    assert!((2 * 3600 - 60..=2 * 3600).contains(&lifetime), "{lifetime}");

    // A verifier with another secret refuses it.
    let other = Verifier::new(AuthConfig {
        hs256_secret: Some("another".into()),
        ..AuthConfig::default()
    })
    .expect("verifier");
    assert!(other.verify(token).await.is_err());
}

#[test]
fn roles_are_case_insensitive() {
    for role in ["member", "MEMBER", "Member"] {
        let output = yard(
            &[("AUTH_HS256_SECRET", SECRET)],
            &["dev-token", "--org", "acme", "--role", role],
        );
        assert!(output.status.success(), "{role}: {}", stderr(&output));
    }
}

#[test]
fn a_missing_secret_is_a_clear_error_with_exit_code_2() {
    for env in [&[][..], &[("AUTH_HS256_SECRET", "  ")][..]] {
        let output = yard(env, &["dev-token", "--org", "acme"]);
        assert_eq!(output.status.code(), Some(2));
        assert!(stdout(&output).is_empty());
        assert!(
            stderr(&output).contains("AUTH_HS256_SECRET"),
            "{}",
            stderr(&output)
        );
    }
}

#[test]
fn bad_arguments_exit_with_code_2() {
    let env = [("AUTH_HS256_SECRET", SECRET)];
    for args in [
        &["dev-token"][..],
        &["dev-token", "--org", "has space"],
        &["dev-token", "--org", "acme", "--role", "Superuser"],
        &["dev-token", "--org", "acme", "--ttl-hours", "0"],
        &["dev-token", "--org", "acme", "--user", ""],
        &["no-such-command"],
    ] {
        let output = yard(&env, args);
        assert_eq!(output.status.code(), Some(2), "{args:?}");
        assert!(stdout(&output).is_empty(), "{args:?}");
    }
}

#[test]
fn help_lists_dev_token() {
    let output = yard(&[], &["--help"]);
    assert!(output.status.success());
    assert!(stdout(&output).contains("dev-token"));
}

mod against_job_api {
    //! The job commands against a real job-api (in-process) and PostgreSQL.

    use std::process::Command;
    use std::time::Duration;

    use test_support::{TestDb, TestRedis, common_config, spawn_service};

    const SECRET: &str = "yard-cli-secret";

    fn yard(api: &str, token: &str, args: &[&str]) -> (Option<i32>, String, String) {
        let output = Command::new(env!("CARGO_BIN_EXE_yard"))
            .args(args)
            .env("SWITCHYARD_API_URL", api)
            .env("SWITCHYARD_TOKEN", token)
            .env("SWITCHYARD_ORG", "acme")
            .output()
            .expect("run yard");
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn submit_list_show_cancel_and_exit_codes() {
        let db = TestDb::new().await;
        let redis = TestRedis::new();
        let config = job_api::Config {
            common: common_config(job_api::SERVICE, &db, redis.url(), redis.prefix()),
            addr: "127.0.0.1:0".parse().expect("addr"),
            auth: auth::AuthConfig {
                hs256_secret: Some(SECRET.into()),
                ..auth::AuthConfig::default()
            },
            cancel_grace: Duration::from_secs(30),
            cors_origins: vec!["http://127.0.0.1:8090".into()],
            lease_on_create: Some(Duration::from_secs(10)),
        };
        let service =
            spawn_service(move |listener, shutdown| job_api::run(config, listener, shutdown));
        let api = service.url();
        let token = auth::dev::mint_hs256(
            SECRET,
            None,
            "cli-user",
            &[(
                domain::OrgId::parse("acme").expect("org"),
                auth::Role::Owner,
            )],
            Duration::from_secs(600),
        );
        let outcome = tokio::task::spawn_blocking(move || {
            let (code, out, err) = yard(
                &api,
                &token,
                &["jobs", "submit", "--command", "echo hi", "--label", "linux"],
            );
            assert_eq!(code, Some(0), "{err}");
            let id = out.split_whitespace().next().expect("id").to_owned();
            assert!(out.contains("queued"), "{out}");

            let (code, out, _) = yard(&api, &token, &["jobs", "list"]);
            assert_eq!(code, Some(0));
            assert!(out.starts_with("ID") && out.contains(&id), "{out}");

            let (code, out, _) = yard(&api, &token, &["jobs", "show", &id, "--json"]);
            assert_eq!(code, Some(0));
            let detail: serde_json::Value = serde_json::from_str(&out).expect("json");
            assert_eq!(detail["status"], "queued");

            let (code, out, _) = yard(&api, &token, &["jobs", "cancel", &id]);
            assert_eq!(code, Some(0));
            assert!(out.contains("cancelled"), "{out}");

            let (code, _, err) = yard(&api, &token, &["jobs", "approve", &id]);
            assert_eq!(code, Some(5), "a state conflict: {err}");
            let (code, _, _) = yard(
                &api,
                &token,
                &["jobs", "show", "01a20000-0000-7000-8000-000000000000"],
            );
            assert_eq!(code, Some(3), "not found");
            let (code, _, err) = yard(&api, "not-a-token", &["jobs", "list"]);
            assert_eq!(code, Some(4), "{err}");
            let (code, _, err) = yard(&api, &token, &["jobs", "submit", "--priority", "99999"]);
            assert_eq!(code, Some(5));
            assert!(err.contains("priority"), "field errors are shown: {err}");
        })
        .await;
        service.stop().await.expect("stop");
        outcome.expect("cli checks");
    }
}
