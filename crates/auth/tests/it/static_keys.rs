//! RS256 with a static PEM (PropelAuth's model), and algorithm confusion.

use auth::{AuthConfig, AuthError, Verifier};
use jsonwebtoken::Algorithm;
use serde_json::json;

use crate::{claims, ec_key, fixture, hs256, pem_verifier, raw_token, rsa_key, sign};

#[tokio::test(flavor = "multi_thread")]
async fn rs256_with_a_static_pem_round_trips() {
    let verifier = pem_verifier();
    assert_eq!(verifier.modes(), ["rs256_pem"]);
    let token = sign(Algorithm::RS256, &rsa_key(1), None, &claims(600));
    let principal = verifier.verify(&token).await.expect("valid");
    assert_eq!(principal.user_id, "u-1");
    assert_eq!(principal.email.as_deref(), Some("ada@example.com"));

    // A kid is irrelevant when no JWKS is configured.
    let with_kid = sign(
        Algorithm::RS256,
        &rsa_key(1),
        Some("whatever"),
        &claims(600),
    );
    assert!(verifier.verify(&with_kid).await.is_ok());
}

#[tokio::test(flavor = "multi_thread")]
async fn rs256_signed_by_another_key_is_a_bad_signature() {
    let token = sign(Algorithm::RS256, &rsa_key(2), None, &claims(600));
    assert!(matches!(
        pem_verifier().verify(&token).await,
        Err(AuthError::BadSignature)
    ));
}

#[tokio::test(flavor = "multi_thread")]
async fn rs256_rules_match_hs256_rules() {
    let expired = sign(Algorithm::RS256, &rsa_key(1), None, &claims(-120));
    assert!(matches!(
        pem_verifier().verify(&expired).await,
        Err(AuthError::Expired)
    ));
}

#[tokio::test(flavor = "multi_thread")]
async fn es256_is_not_accepted_with_only_a_static_rsa_pem() {
    let token = sign(Algorithm::ES256, &ec_key(), None, &claims(600));
    assert!(matches!(
        pem_verifier().verify(&token).await,
        Err(AuthError::UnsupportedAlgorithm(a)) if a == "ES256"
    ));
}

/// The classic attack: sign HS256 with the (public) RSA key as the HMAC
/// secret, hoping the verifier uses "its key" with the token's algorithm.
#[tokio::test(flavor = "multi_thread")]
async fn hs256_signed_with_the_public_pem_is_refused_by_a_pem_verifier() {
    let public_pem = fixture("test_only_rsa1_public.pem");
    let forged = hs256(&public_pem, &claims(600));
    assert!(matches!(
        pem_verifier().verify(&forged).await,
        Err(AuthError::UnsupportedAlgorithm(a)) if a == "HS256"
    ));
}

#[tokio::test(flavor = "multi_thread")]
async fn hs256_signed_with_the_public_pem_is_refused_when_hs256_is_also_on() {
    let public_pem = fixture("test_only_rsa1_public.pem");
    let verifier = Verifier::new(AuthConfig {
        rs256_public_key: Some(public_pem.clone()),
        hs256_secret: Some("a-different-dev-secret".into()),
        ..AuthConfig::default()
    })
    .expect("verifier");
    assert_eq!(verifier.modes(), ["rs256_pem", "hs256"]);

    let forged = hs256(&public_pem, &claims(600));
    assert!(matches!(
        verifier.verify(&forged).await,
        Err(AuthError::BadSignature)
    ));

    // The same HMAC signature relabelled RS256 is checked as RSA and fails.
    let signature = forged.rsplit('.').next().expect("signature");
    let relabelled = raw_token(
        &json!({ "alg": "RS256", "typ": "JWT" }),
        &claims(600),
        signature,
    );
    assert!(matches!(
        verifier.verify(&relabelled).await,
        Err(AuthError::BadSignature)
    ));

    // Both modes still work for their own tokens.
    let rs = sign(Algorithm::RS256, &rsa_key(1), None, &claims(600));
    assert!(verifier.verify(&rs).await.is_ok());
    let hs = hs256("a-different-dev-secret", &claims(600));
    assert!(verifier.verify(&hs).await.is_ok());
}

#[test]
fn the_hs256_secret_may_not_be_the_public_key() {
    let public_pem = fixture("test_only_rsa1_public.pem");
    let result = Verifier::new(AuthConfig {
        rs256_public_key: Some(public_pem.clone()),
        hs256_secret: Some(public_pem),
        ..AuthConfig::default()
    });
    assert!(matches!(result, Err(AuthError::KeySource(_))));
}

#[tokio::test(flavor = "multi_thread")]
async fn rs256_tokens_are_refused_by_an_hs256_only_verifier() {
    let token = sign(Algorithm::RS256, &rsa_key(1), None, &claims(600));
    assert!(matches!(
        crate::hs_verifier().verify(&token).await,
        Err(AuthError::UnsupportedAlgorithm(a)) if a == "RS256"
    ));
}
