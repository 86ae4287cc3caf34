//! `AuthConfig::from_source`: variables, errors that name them, PEM from a
//! file, and secrets kept out of Debug output.

use std::collections::HashMap;

use auth::{AuthConfig, AuthError, Verifier};
use jsonwebtoken::Algorithm;

use crate::{SECRET, claims, fixture, fixture_path, rsa_key, sign};

fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
    let map: HashMap<String, String> = pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    move |name: &str| map.get(name).cloned()
}

#[test]
fn a_key_source_is_required_and_the_error_names_the_variables() {
    let error = AuthConfig::from_source(&env(&[("AUTH_ISSUER", "https://x")])).expect_err("fails");
    assert_eq!(error.variable, "AUTH_RS256_PUBLIC_KEY");
    let line = error.to_string();
    assert!(
        line.contains("AUTH_JWKS_URL") && line.contains("AUTH_HS256_SECRET"),
        "{line}"
    );

    // Blank counts as unset.
    let error = AuthConfig::from_source(&env(&[("AUTH_HS256_SECRET", "  ")])).expect_err("fails");
    assert_eq!(error.variable, "AUTH_RS256_PUBLIC_KEY");
}

#[test]
fn every_variable_is_read() {
    let pem = fixture("test_only_rsa1_public.pem");
    let config = AuthConfig::from_source(&env(&[
        ("AUTH_RS256_PUBLIC_KEY", &pem),
        ("AUTH_JWKS_URL", "http://127.0.0.1:1/jwks"),
        ("AUTH_HS256_SECRET", SECRET),
        ("AUTH_ISSUER", "https://auth.example.com"),
        ("AUTH_AUDIENCE", "switchyard"),
    ]))
    .expect("config");
    assert_eq!(config.rs256_public_key.as_deref(), Some(pem.trim()));
    assert_eq!(config.jwks_url.as_deref(), Some("http://127.0.0.1:1/jwks"));
    assert_eq!(config.hs256_secret.as_deref(), Some(SECRET));
    assert_eq!(config.issuer.as_deref(), Some("https://auth.example.com"));
    assert_eq!(config.audience.as_deref(), Some("switchyard"));
    assert_eq!(
        Verifier::new(config).expect("verifier").modes(),
        ["rs256_pem", "jwks", "hs256"]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_public_key_may_be_a_path_to_a_pem_file() {
    let path = fixture_path("test_only_rsa1_public.pem");
    let config =
        AuthConfig::from_source(&env(&[("AUTH_RS256_PUBLIC_KEY", &path)])).expect("config");
    assert_eq!(
        config.rs256_public_key.as_deref(),
        Some(fixture("test_only_rsa1_public.pem").as_str())
    );
    let verifier = Verifier::new(config).expect("verifier");
    let token = sign(Algorithm::RS256, &rsa_key(1), None, &claims(600));
    assert!(verifier.verify(&token).await.is_ok());
}

#[tokio::test(flavor = "multi_thread")]
async fn the_public_key_may_be_pem_text_with_escaped_newlines() {
    let escaped = fixture("test_only_rsa1_public.pem")
        .trim()
        .replace('\n', "\\n");
    let config =
        AuthConfig::from_source(&env(&[("AUTH_RS256_PUBLIC_KEY", &escaped)])).expect("config");
    let verifier = Verifier::new(config).expect("verifier");
    let token = sign(Algorithm::RS256, &rsa_key(1), None, &claims(600));
    assert!(verifier.verify(&token).await.is_ok());
}

#[test]
fn bad_public_keys_are_named() {
    for value in [
        "/no/such/file.pem".to_owned(),
        "-----BEGIN PUBLIC KEY-----\nnot base64\n-----END PUBLIC KEY-----".to_owned(),
        fixture("test_only_ec_p256_public.pem"),
        fixture("test_only_rsa1_private.pem"),
        fixture_path("test_only_rsa1_public.jwk.json"),
    ] {
        let error =
            AuthConfig::from_source(&env(&[("AUTH_RS256_PUBLIC_KEY", &value)])).expect_err("fails");
        assert_eq!(error.variable, "AUTH_RS256_PUBLIC_KEY");
        assert!(
            !error.to_string().contains("MII"),
            "no key material in {error}"
        );
    }
}

#[test]
fn jwks_urls_must_be_http_or_https() {
    for bad in ["ftp://idp/jwks", "not a url", "file:///etc/passwd"] {
        let error = AuthConfig::from_source(&env(&[("AUTH_JWKS_URL", bad)])).expect_err(bad);
        assert_eq!(error.variable, "AUTH_JWKS_URL");
    }
    assert!(AuthConfig::from_source(&env(&[("AUTH_JWKS_URL", "http://idp.local/jwks")])).is_ok());
    // https needs the default "https" feature (rustls with ring).
    let https = AuthConfig::from_source(&env(&[(
        "AUTH_JWKS_URL",
        "https://auth.example.com/.well-known/jwks.json",
    )]));
    assert_eq!(https.is_ok(), cfg!(feature = "https"), "{https:?}");
}

#[test]
fn debug_output_redacts_the_secret() {
    let config = AuthConfig {
        rs256_public_key: Some(fixture("test_only_rsa1_public.pem")),
        hs256_secret: Some(SECRET.into()),
        issuer: Some("https://auth.example.com".into()),
        ..AuthConfig::default()
    };
    let shown = format!("{config:?} {config:#?}");
    assert!(!shown.contains(SECRET), "{shown}");
    assert!(shown.contains("redacted"));
    assert!(!shown.contains("MII"), "PEM bodies are summarised: {shown}");
    assert!(shown.contains("https://auth.example.com"));

    let verifier = Verifier::new(config).expect("verifier");
    let shown = format!("{verifier:?}");
    assert!(!shown.contains(SECRET), "{shown}");
}

#[test]
fn a_verifier_needs_a_key_source() {
    assert!(matches!(
        Verifier::new(AuthConfig::default()),
        Err(AuthError::KeySource(_))
    ));
    assert!(matches!(
        Verifier::new(AuthConfig {
            hs256_secret: Some(String::new()),
            ..AuthConfig::default()
        }),
        Err(AuthError::KeySource(_))
    ));
    assert!(matches!(
        Verifier::new(AuthConfig {
            rs256_public_key: Some("garbage".into()),
            ..AuthConfig::default()
        }),
        Err(AuthError::KeySource(_))
    ));
}
