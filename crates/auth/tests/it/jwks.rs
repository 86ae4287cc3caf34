//! Keys from a JWKS URL, chosen by `kid`, served by a tiny HTTP server on
//! 127.0.0.1 that counts its requests.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use auth::{AuthConfig, AuthError, Verifier};
use jsonwebtoken::Algorithm;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::{SECRET, claims, ec_key, fixture, raw_token, rsa_key, sign};

/// Serves `GET /jwks` with whatever document is current; one response per
/// connection.
struct JwksServer {
    url: String,
    document: Arc<Mutex<Value>>,
    requests: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl JwksServer {
    async fn start(document: Value) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}/jwks", listener.local_addr().expect("addr"));
        let document = Arc::new(Mutex::new(document));
        let requests = Arc::new(AtomicUsize::new(0));
        let (doc, count) = (document.clone(), requests.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    return;
                };
                let (doc, count) = (doc.clone(), count.clone());
                tokio::spawn(async move {
                    let mut request = Vec::new();
                    let mut buffer = [0u8; 1024];
                    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut buffer).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => request.extend_from_slice(&buffer[..n]),
                        }
                    }
                    count.fetch_add(1, Ordering::SeqCst);
                    let body = doc.lock().expect("lock").to_string();
                    let response = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = stream.write_all(response.as_bytes()).await;
                    let _ = stream.shutdown().await;
                });
            }
        });
        Self {
            url,
            document,
            requests,
            task,
        }
    }

    fn serve(&self, document: Value) {
        *self.document.lock().expect("lock") = document;
    }

    fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }

    fn verifier(&self) -> Verifier {
        Verifier::new(AuthConfig {
            jwks_url: Some(self.url.clone()),
            ..AuthConfig::default()
        })
        .expect("verifier")
    }
}

impl Drop for JwksServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A fixture public JWK with `kid` added.
fn jwk(file: &str, kid: &str) -> Value {
    let mut jwk: Value = serde_json::from_str(&fixture(file)).expect("jwk json");
    jwk["kid"] = json!(kid);
    jwk
}

fn rsa_jwk(which: u8, kid: &str) -> Value {
    jwk(&format!("test_only_rsa{which}_public.jwk.json"), kid)
}

fn ec_jwk(kid: &str) -> Value {
    jwk("test_only_ec_p256_public.jwk.json", kid)
}

#[tokio::test(flavor = "multi_thread")]
async fn rs256_and_es256_tokens_are_verified_by_kid() {
    let server = JwksServer::start(json!({ "keys": [rsa_jwk(1, "rsa-1"), ec_jwk("ec-1")] })).await;
    let verifier = server.verifier();
    assert_eq!(verifier.modes(), ["jwks"]);

    let rs = sign(Algorithm::RS256, &rsa_key(1), Some("rsa-1"), &claims(600));
    let es = sign(Algorithm::ES256, &ec_key(), Some("ec-1"), &claims(600));
    assert_eq!(verifier.verify(&rs).await.expect("rs256").user_id, "u-1");
    assert_eq!(verifier.verify(&es).await.expect("es256").user_id, "u-1");
    assert!(verifier.verify(&rs).await.is_ok());

    assert_eq!(server.requests(), 1, "keys are cached");
}

#[tokio::test(flavor = "multi_thread")]
async fn clones_share_one_key_cache() {
    let server = JwksServer::start(json!({ "keys": [rsa_jwk(1, "rsa-1")] })).await;
    let verifier = server.verifier();
    let token = sign(Algorithm::RS256, &rsa_key(1), Some("rsa-1"), &claims(600));
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let (verifier, token) = (verifier.clone(), token.clone());
            tokio::spawn(async move { verifier.verify(&token).await.is_ok() })
        })
        .collect();
    for task in tasks {
        assert!(task.await.expect("task"));
    }
    assert_eq!(
        server.requests(),
        1,
        "concurrent first uses share one fetch"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rotated_in_key_is_fetched_when_its_kid_appears() {
    let server = JwksServer::start(json!({ "keys": [rsa_jwk(1, "rsa-1")] })).await;
    let verifier = server.verifier();
    let old = sign(Algorithm::RS256, &rsa_key(1), Some("rsa-1"), &claims(600));
    assert!(verifier.verify(&old).await.is_ok());
    assert_eq!(server.requests(), 1);

    // The IdP publishes a new key and starts signing with it.
    server.serve(json!({ "keys": [rsa_jwk(1, "rsa-1"), rsa_jwk(2, "rsa-2")] }));
    let new = sign(Algorithm::RS256, &rsa_key(2), Some("rsa-2"), &claims(600));
    assert!(verifier.verify(&new).await.is_ok());
    assert_eq!(server.requests(), 2);
    assert!(verifier.verify(&old).await.is_ok());
    assert_eq!(server.requests(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_kids_cause_at_most_one_refetch_per_window() {
    let server = JwksServer::start(json!({ "keys": [rsa_jwk(1, "rsa-1")] })).await;
    let verifier = server.verifier();
    let genuine = sign(Algorithm::RS256, &rsa_key(1), Some("rsa-1"), &claims(600));
    assert!(verifier.verify(&genuine).await.is_ok());
    assert_eq!(server.requests(), 1);

    let first = sign(Algorithm::RS256, &rsa_key(1), Some("bogus-0"), &claims(600));
    assert!(matches!(
        verifier.verify(&first).await,
        Err(AuthError::UnknownKey(kid)) if kid == "bogus-0"
    ));
    assert_eq!(server.requests(), 2, "the first unknown kid refetches");

    // A flood, sequential and concurrent: no further requests. (The
    // signature is never looked at: there is no key to check it with.)
    let bogus = |i: usize| {
        raw_token(
            &json!({ "alg": "RS256", "kid": format!("bogus-{i}") }),
            &claims(600),
            "c2lnbmF0dXJl",
        )
    };
    for i in 1..20 {
        let token = bogus(i);
        assert!(matches!(
            verifier.verify(&token).await,
            Err(AuthError::UnknownKey(_))
        ));
    }
    let tasks: Vec<_> = (20..40)
        .map(|i| {
            let verifier = verifier.clone();
            let token = bogus(i);
            tokio::spawn(async move { verifier.verify(&token).await })
        })
        .collect();
    for task in tasks {
        assert!(matches!(
            task.await.expect("task"),
            Err(AuthError::UnknownKey(_))
        ));
    }
    assert_eq!(server.requests(), 2, "rate-limited within the window");

    // Known keys keep working meanwhile.
    assert!(verifier.verify(&genuine).await.is_ok());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_kid_naming_a_key_of_another_type_is_refused() {
    let server = JwksServer::start(json!({ "keys": [rsa_jwk(1, "rsa-1"), ec_jwk("ec-1")] })).await;
    let verifier = server.verifier();
    // ES256 header pointing at the RSA key, and the reverse.
    let es_for_rsa = sign(Algorithm::ES256, &ec_key(), Some("rsa-1"), &claims(600));
    assert!(matches!(
        verifier.verify(&es_for_rsa).await,
        Err(AuthError::UnsupportedAlgorithm(_))
    ));
    let rs_for_ec = sign(Algorithm::RS256, &rsa_key(1), Some("ec-1"), &claims(600));
    assert!(matches!(
        verifier.verify(&rs_for_ec).await,
        Err(AuthError::UnsupportedAlgorithm(_))
    ));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_token_signed_by_another_key_under_a_known_kid_is_a_bad_signature() {
    let server = JwksServer::start(json!({ "keys": [rsa_jwk(1, "rsa-1")] })).await;
    let token = sign(Algorithm::RS256, &rsa_key(2), Some("rsa-1"), &claims(600));
    assert!(matches!(
        server.verifier().verify(&token).await,
        Err(AuthError::BadSignature)
    ));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_jwks_cannot_enable_hs256() {
    use base64::Engine;
    let k = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(SECRET);
    let server = JwksServer::start(json!({ "keys": [
        { "kty": "oct", "kid": "hs", "alg": "HS256", "k": k },
        rsa_jwk(1, "rsa-1"),
    ] }))
    .await;
    let verifier = server.verifier();
    let mut header = jsonwebtoken::Header::new(Algorithm::HS256);
    header.kid = Some("hs".into());
    let token = jsonwebtoken::encode(
        &header,
        &claims(600),
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("sign");
    assert!(matches!(
        verifier.verify(&token).await,
        Err(AuthError::UnsupportedAlgorithm(a)) if a == "HS256"
    ));
    // Nor does an RS256 header naming the oct key get anywhere.
    let rs = sign(Algorithm::RS256, &rsa_key(1), Some("hs"), &claims(600));
    assert!(matches!(
        verifier.verify(&rs).await,
        Err(AuthError::UnknownKey(_))
    ));
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unreachable_jwks_is_a_key_source_error() {
    // A port that was free a moment ago: connection refused.
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("addr").port()
    };
    let verifier = Verifier::new(AuthConfig {
        jwks_url: Some(format!("http://127.0.0.1:{port}/jwks")),
        ..AuthConfig::default()
    })
    .expect("verifier");
    let token = sign(Algorithm::RS256, &rsa_key(1), Some("rsa-1"), &claims(600));
    let error = verifier.verify(&token).await.expect_err("refused");
    assert!(matches!(error, AuthError::KeySource(_)), "{error:?}");
    assert!(error.is_server_side());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_fetch_is_not_retried_at_once() {
    let server = JwksServer::start(json!({ "keys": [] })).await;
    let verifier = server.verifier();
    let token = sign(Algorithm::RS256, &rsa_key(1), Some("rsa-1"), &claims(600));
    for _ in 0..5 {
        assert!(matches!(
            verifier.verify(&token).await,
            Err(AuthError::KeySource(_))
        ));
    }
    assert_eq!(server.requests(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn with_jwks_and_a_pem_tokens_without_kid_use_the_pem() {
    let server = JwksServer::start(json!({ "keys": [rsa_jwk(2, "rsa-2")] })).await;
    let verifier = Verifier::new(AuthConfig {
        rs256_public_key: Some(fixture("test_only_rsa1_public.pem")),
        jwks_url: Some(server.url.clone()),
        ..AuthConfig::default()
    })
    .expect("verifier");
    assert_eq!(verifier.modes(), ["rs256_pem", "jwks"]);

    let by_pem = sign(Algorithm::RS256, &rsa_key(1), None, &claims(600));
    assert!(verifier.verify(&by_pem).await.is_ok());
    assert_eq!(server.requests(), 0);

    let by_kid = sign(Algorithm::RS256, &rsa_key(2), Some("rsa-2"), &claims(600));
    assert!(verifier.verify(&by_kid).await.is_ok());

    // A kid is looked up in the JWKS only, never tried against the PEM.
    let pem_key_with_kid = sign(Algorithm::RS256, &rsa_key(1), Some("rsa-1"), &claims(600));
    assert!(matches!(
        verifier.verify(&pem_key_with_kid).await,
        Err(AuthError::UnknownKey(_))
    ));

    // ES256 needs a kid.
    let es = sign(Algorithm::ES256, &ec_key(), None, &claims(600));
    assert!(matches!(
        verifier.verify(&es).await,
        Err(AuthError::UnknownKey(_))
    ));
}

/// An https URL really goes through TLS (here against a server that
/// answers in plain HTTP, so the handshake fails): a key-source error, not
/// a panic and not a plain-HTTP fetch.
#[cfg(feature = "https")]
#[tokio::test(flavor = "multi_thread")]
async fn https_jwks_urls_use_tls() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("https://{}/jwks", listener.local_addr().expect("addr"));
    let server = tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let _ = stream
                .write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
                .await;
            let _ = stream.shutdown().await;
        }
    });
    let verifier = Verifier::new(AuthConfig {
        jwks_url: Some(url),
        ..AuthConfig::default()
    })
    .expect("verifier");
    let token = sign(Algorithm::RS256, &rsa_key(1), Some("rsa-1"), &claims(600));
    assert!(matches!(
        verifier.verify(&token).await,
        Err(AuthError::KeySource(_))
    ));
    server.abort();
}
