//! Specification of the `auth` crate: which tokens are accepted, which are
//! refused and why, and what a verified token grants.

mod bearer;
mod config;
mod jwks;
mod principal;
mod static_keys;
mod tokens;

use std::time::{SystemTime, UNIX_EPOCH};

use auth::{AuthConfig, Verifier};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

pub const SECRET: &str = "test-only-hs256-secret-0123456789abcdef";
pub const ISSUER: &str = "https://auth.example.com";

/// The text of a file in `tests/fixtures` (test-only keys).
pub fn fixture(name: &str) -> String {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

pub fn fixture_path(name: &str) -> String {
    format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))
}

pub fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs() as i64
}

/// PropelAuth-shaped claims for user `u-1`, Admin of `acme`, expiring in
/// `exp_in` seconds (negative: in the past).
pub fn claims(exp_in: i64) -> Value {
    json!({
        "user_id": "u-1",
        "email": "ada@example.com",
        "iat": now() - 10,
        "exp": now() + exp_in,
        "org_id_to_org_member_info": {
            "acme": {
                "org_id": "acme",
                "org_name": "Acme",
                "user_role": "Admin",
                "inherited_user_roles_plus_current_role": ["Admin", "Member"],
                "user_permissions": ["jobs:create"]
            }
        }
    })
}

/// `claims` plus or minus some fields.
pub fn claims_with(exp_in: i64, extra: Value) -> Value {
    let mut claims = claims(exp_in);
    let object = claims.as_object_mut().expect("object");
    for (key, value) in extra.as_object().expect("object") {
        if value.is_null() {
            object.remove(key);
        } else {
            object.insert(key.clone(), value.clone());
        }
    }
    claims
}

pub fn sign(alg: Algorithm, key: &EncodingKey, kid: Option<&str>, claims: &Value) -> String {
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&header, claims, key).expect("sign")
}

pub fn hs256(secret: &str, claims: &Value) -> String {
    sign(
        Algorithm::HS256,
        &EncodingKey::from_secret(secret.as_bytes()),
        None,
        claims,
    )
}

pub fn rsa_key(which: u8) -> EncodingKey {
    EncodingKey::from_rsa_pem(fixture(&format!("test_only_rsa{which}_private.pem")).as_bytes())
        .expect("RSA private key")
}

pub fn ec_key() -> EncodingKey {
    EncodingKey::from_ec_pem(fixture("test_only_ec_p256_private.pem").as_bytes())
        .expect("EC private key")
}

pub fn hs_verifier() -> Verifier {
    Verifier::new(AuthConfig {
        hs256_secret: Some(SECRET.into()),
        ..AuthConfig::default()
    })
    .expect("verifier")
}

pub fn pem_verifier() -> Verifier {
    Verifier::new(AuthConfig {
        rs256_public_key: Some(fixture("test_only_rsa1_public.pem")),
        ..AuthConfig::default()
    })
    .expect("verifier")
}

/// A token with an arbitrary header, payload and signature segment.
pub fn raw_token(header: &Value, payload: &Value, signature: &str) -> String {
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    format!(
        "{}.{}.{signature}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(payload.to_string())
    )
}
