//! Claims rules (exp, iss, aud), signatures and malformed input, shown with
//! HS256 tokens; the rules are the same for every algorithm.

use std::time::Duration;

use auth::{AuthConfig, AuthError, Role, Verifier, dev};
use domain::OrgId;
use serde_json::json;

use crate::{ISSUER, SECRET, claims, claims_with, hs_verifier, hs256, raw_token};

fn org(id: &str) -> OrgId {
    OrgId::parse(id).expect("org id")
}

#[tokio::test(flavor = "multi_thread")]
async fn dev_minted_token_round_trips() {
    let verifier = Verifier::new(AuthConfig {
        hs256_secret: Some(SECRET.into()),
        issuer: Some(ISSUER.into()),
        ..AuthConfig::default()
    })
    .expect("verifier");
    let token = dev::mint_hs256(
        SECRET,
        Some(ISSUER),
        "dev-user",
        &[(org("acme"), Role::Owner), (org("globex"), Role::Member)],
        Duration::from_secs(3600),
    );

    let principal = verifier.verify(&token).await.expect("valid");

    assert_eq!(principal.user_id, "dev-user");
    assert_eq!(principal.actor(), "user:dev-user");
    assert_eq!(principal.orgs.len(), 2);
    let acme = principal.membership(&org("acme")).expect("acme");
    assert_eq!(acme.role, Role::Owner);
    assert_eq!(acme.roles, ["Owner", "Admin", "Member"]);
    assert_eq!(
        principal.membership(&org("globex")).expect("globex").role,
        Role::Member
    );
    assert!(principal.membership(&org("initech")).is_none());
    assert_eq!(verifier.modes(), ["hs256"]);
}

/// A token answered from memory still expires on time: the verifier's
/// memory of it never outlives `exp` plus the leeway.
#[tokio::test(flavor = "multi_thread")]
async fn a_remembered_token_is_refused_once_it_expires() {
    let verifier = hs_verifier();
    let leeway = auth::verifier::LEEWAY_SECS as i64;
    let token = hs256(SECRET, &claims(2 - leeway));
    for _ in 0..3 {
        assert!(verifier.verify(&token).await.is_ok());
    }
    tokio::time::sleep(Duration::from_millis(3_100)).await;
    assert!(matches!(
        verifier.verify(&token).await,
        Err(AuthError::Expired)
    ));
}

/// A refused token stays refused, and a good token verified meanwhile does
/// not vouch for another with the same claims and a bad signature.
#[tokio::test(flavor = "multi_thread")]
async fn only_the_exact_verified_token_is_remembered() {
    let verifier = hs_verifier();
    let claims = claims(600);
    let good = hs256(SECRET, &claims);
    let forged = hs256("another secret of at least 32 bytes!", &claims);
    assert!(verifier.verify(&good).await.is_ok());
    for _ in 0..2 {
        assert!(matches!(
            verifier.verify(&forged).await,
            Err(AuthError::BadSignature)
        ));
    }
    assert!(verifier.verify(&good).await.is_ok());
}

#[tokio::test(flavor = "multi_thread")]
async fn expired_beyond_leeway_is_refused_within_leeway_accepted() {
    let verifier = hs_verifier();
    let expired = hs256(SECRET, &claims(-120));
    assert!(matches!(
        verifier.verify(&expired).await,
        Err(AuthError::Expired)
    ));

    let just_expired = hs256(SECRET, &claims(-30));
    assert!(verifier.verify(&just_expired).await.is_ok());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_token_without_exp_is_refused() {
    let token = hs256(SECRET, &claims_with(60, json!({ "exp": null })));
    assert!(matches!(
        hs_verifier().verify(&token).await,
        Err(AuthError::Malformed(m)) if m.contains("exp")
    ));
}

#[tokio::test(flavor = "multi_thread")]
async fn issuer_is_checked_when_configured() {
    let verifier = Verifier::new(AuthConfig {
        hs256_secret: Some(SECRET.into()),
        issuer: Some(ISSUER.into()),
        ..AuthConfig::default()
    })
    .expect("verifier");

    let right = hs256(SECRET, &claims_with(600, json!({ "iss": ISSUER })));
    assert!(verifier.verify(&right).await.is_ok());

    let wrong = hs256(
        SECRET,
        &claims_with(600, json!({ "iss": "https://evil.example.com" })),
    );
    assert!(matches!(
        verifier.verify(&wrong).await,
        Err(AuthError::WrongIssuer)
    ));

    let missing = hs256(SECRET, &claims(600));
    assert!(matches!(
        verifier.verify(&missing).await,
        Err(AuthError::WrongIssuer)
    ));

    // Not configured: any issuer passes.
    assert!(hs_verifier().verify(&wrong).await.is_ok());
}

#[tokio::test(flavor = "multi_thread")]
async fn audience_is_checked_only_when_configured() {
    let verifier = Verifier::new(AuthConfig {
        hs256_secret: Some(SECRET.into()),
        audience: Some("switchyard".into()),
        ..AuthConfig::default()
    })
    .expect("verifier");

    let right = hs256(SECRET, &claims_with(600, json!({ "aud": "switchyard" })));
    assert!(verifier.verify(&right).await.is_ok());
    let among_many = hs256(
        SECRET,
        &claims_with(600, json!({ "aud": ["other", "switchyard"] })),
    );
    assert!(verifier.verify(&among_many).await.is_ok());

    let wrong = hs256(SECRET, &claims_with(600, json!({ "aud": "other" })));
    assert!(matches!(
        verifier.verify(&wrong).await,
        Err(AuthError::WrongAudience)
    ));
    let missing = hs256(SECRET, &claims(600));
    assert!(matches!(
        verifier.verify(&missing).await,
        Err(AuthError::WrongAudience)
    ));

    // Not configured (PropelAuth's default): `aud` is ignored.
    assert!(hs_verifier().verify(&wrong).await.is_ok());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_secret_or_tampered_payload_is_a_bad_signature() {
    let verifier = hs_verifier();
    let other_secret = hs256("another-secret", &claims(600));
    assert!(matches!(
        verifier.verify(&other_secret).await,
        Err(AuthError::BadSignature)
    ));

    // Same header and signature, payload promoting the user to Owner.
    let genuine = hs256(SECRET, &claims(600));
    let parts: Vec<&str> = genuine.split('.').collect();
    let mut promoted = claims(600);
    promoted["org_id_to_org_member_info"]["acme"]["user_role"] = json!("Owner");
    let forged = raw_token(
        &json!({ "alg": "HS256", "typ": "JWT" }),
        &promoted,
        parts[2],
    );
    assert!(matches!(
        verifier.verify(&forged).await,
        Err(AuthError::BadSignature)
    ));
}

#[tokio::test(flavor = "multi_thread")]
async fn alg_none_is_refused() {
    let verifier = hs_verifier();
    for alg in ["none", "None", "NONE"] {
        let token = raw_token(&json!({ "alg": alg, "typ": "JWT" }), &claims(600), "");
        assert!(
            matches!(verifier.verify(&token).await, Err(AuthError::UnsupportedAlgorithm(a)) if a == alg),
            "alg {alg}"
        );
    }
    // Even with a signature segment copied from a genuine token.
    let genuine = hs256(SECRET, &claims(600));
    let signature = genuine.rsplit('.').next().expect("signature");
    let token = raw_token(&json!({ "alg": "none" }), &claims(600), signature);
    assert!(matches!(
        verifier.verify(&token).await,
        Err(AuthError::UnsupportedAlgorithm(_))
    ));
}

#[tokio::test(flavor = "multi_thread")]
async fn other_algorithms_are_refused() {
    let verifier = hs_verifier();
    let hs512 = crate::sign(
        jsonwebtoken::Algorithm::HS512,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
        None,
        &claims(600),
    );
    assert!(matches!(
        verifier.verify(&hs512).await,
        Err(AuthError::UnsupportedAlgorithm(a)) if a == "HS512"
    ));
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_tokens_are_refused() {
    let verifier = hs_verifier();
    assert!(matches!(verifier.verify("").await, Err(AuthError::Missing)));
    assert!(matches!(
        verifier.verify("   ").await,
        Err(AuthError::Missing)
    ));
    for token in [
        "abc",
        "a.b",
        "a.b.c.d",
        "!!!.e30.sig",
        "bm90IGpzb24.e30.sig", // header "not json"
        "e30.e30.sig",         // header {} without alg
    ] {
        assert!(
            matches!(verifier.verify(token).await, Err(AuthError::Malformed(_))),
            "{token}"
        );
    }

    let genuine = hs256(SECRET, &claims(600));
    let (head, _) = genuine.rsplit_once('.').expect("dots");
    let bad_signature_encoding = format!("{head}.***");
    assert!(matches!(
        verifier.verify(&bad_signature_encoding).await,
        Err(AuthError::Malformed(_) | AuthError::BadSignature)
    ));

    // Signed, but not PropelAuth's shape.
    let no_user = hs256(SECRET, &claims_with(600, json!({ "user_id": null })));
    assert!(matches!(
        verifier.verify(&no_user).await,
        Err(AuthError::Malformed(m)) if m.contains("user_id")
    ));
    let bad_user = hs256(SECRET, &claims_with(600, json!({ "user_id": 42 })));
    assert!(matches!(
        verifier.verify(&bad_user).await,
        Err(AuthError::Malformed(_))
    ));
}

#[tokio::test(flavor = "multi_thread")]
async fn errors_never_echo_the_token() {
    let token = hs256("another-secret", &claims(600));
    let error = hs_verifier().verify(&token).await.expect_err("refused");
    let shown = format!("{error} {error:?}");
    assert!(!shown.contains(&token));
    assert!(!shown.contains(SECRET));
}
