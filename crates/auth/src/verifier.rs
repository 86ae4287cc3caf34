//! Verifying a token: choosing the key, checking signature and claims.
//!
//! The accepted algorithm follows from the key, never from the token
//! alone. The header's `alg` only selects among the configured sources:
//!
//! | header `alg` | key used |
//! |---|---|
//! | `HS256` | the HS256 secret, if configured (development only) |
//! | `RS256`, `ES256` with a `kid`, JWKS configured | the JWKS key with that `kid`, whose own type must match `alg` |
//! | `RS256` otherwise | the static RSA PEM |
//! | anything else (`none`, `HS512`, `PS256`, …) | refused |
//!
//! So an HS256 token can never be checked with the RSA public key as an
//! HMAC secret, and an RS256 token is only ever checked against RSA keys.

use std::fmt;
use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::Value;

use crate::cache::{self, VerifiedTokens};
use crate::jwks::{Jwks, algorithm_name};
use crate::{AuthConfig, AuthError, Principal};

/// Clock skew allowed on `exp` (and `nbf`), in seconds.
pub const LEEWAY_SECS: u64 = 60;

/// Checks JWTs against the configured key sources. Cheap to clone: all
/// clones share one JWKS cache.
#[derive(Clone)]
pub struct Verifier {
    inner: Arc<Inner>,
}

struct Inner {
    rs256_pem: Option<DecodingKey>,
    jwks: Option<Jwks>,
    hs256: Option<DecodingKey>,
    issuer: Option<String>,
    audience: Option<String>,
    rs256: Validation,
    es256: Validation,
    hs256_validation: Validation,
    verified: VerifiedTokens,
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Verifier")
            .field("modes", &self.modes())
            .field("issuer", &self.inner.issuer)
            .field("audience", &self.inner.audience)
            .finish_non_exhaustive()
    }
}

impl Verifier {
    /// Checks the configuration and prepares the keys. JWKS keys are
    /// fetched on first use, not here. Logs a warning when HS256 is on.
    pub fn new(config: AuthConfig) -> Result<Self, AuthError> {
        let rs256_pem = match config.rs256_public_key.as_deref() {
            None => None,
            Some(pem) => Some(rsa_pem_key(pem).map_err(|problem| {
                AuthError::KeySource(format!("AUTH_RS256_PUBLIC_KEY {problem}"))
            })?),
        };
        let jwks = config.jwks_url.as_deref().map(Jwks::new).transpose()?;
        let hs256_secret = config.hs256_secret.filter(|s| !s.is_empty());
        if hs256_secret.is_some() && hs256_secret == config.rs256_public_key {
            return Err(AuthError::KeySource(
                "AUTH_HS256_SECRET must not be the RSA public key".into(),
            ));
        }
        let hs256 = hs256_secret.map(|s| DecodingKey::from_secret(s.as_bytes()));
        if rs256_pem.is_none() && jwks.is_none() && hs256.is_none() {
            return Err(AuthError::KeySource(
                "no key source: set AUTH_RS256_PUBLIC_KEY, AUTH_JWKS_URL or AUTH_HS256_SECRET"
                    .into(),
            ));
        }
        let validation =
            |alg| validation(alg, config.issuer.as_deref(), config.audience.as_deref());
        let verifier = Self {
            inner: Arc::new(Inner {
                rs256: validation(Algorithm::RS256),
                es256: validation(Algorithm::ES256),
                hs256_validation: validation(Algorithm::HS256),
                rs256_pem,
                jwks,
                hs256,
                issuer: config.issuer,
                audience: config.audience,
                verified: VerifiedTokens::default(),
            }),
        };
        if verifier.inner.hs256.is_some() {
            tracing::warn!(
                auth.modes = ?verifier.modes(),
                "HS256 tokens are accepted (AUTH_HS256_SECRET): development only, never in production"
            );
        }
        Ok(verifier)
    }

    /// The key sources in use: `rs256_pem`, `jwks`, `hs256`.
    pub fn modes(&self) -> Vec<&'static str> {
        let inner = &self.inner;
        [
            (inner.rs256_pem.is_some(), "rs256_pem"),
            (inner.jwks.is_some(), "jwks"),
            (inner.hs256.is_some(), "hs256"),
        ]
        .into_iter()
        .filter_map(|(on, mode)| on.then_some(mode))
        .collect()
    }

    /// Verifies `token` (the bare JWT, see [`crate::bearer`]) and returns
    /// whom it speaks for. A token verified within the last
    /// [`REVERIFY_AFTER`](crate::REVERIFY_AFTER) and not yet expired is
    /// answered from memory.
    pub async fn verify(&self, token: &str) -> Result<Principal, AuthError> {
        let token = token.trim();
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        let digest = cache::digest(token);
        if let Some(principal) = self.inner.verified.get(&digest) {
            return Ok(principal);
        }
        let header = Header::parse(token)?;
        let inner = &self.inner;
        let jwks_key;
        let (key, validation): (&DecodingKey, &Validation) = match header.alg.as_str() {
            "HS256" => match &inner.hs256 {
                Some(key) => (key, &inner.hs256_validation),
                None => return Err(AuthError::UnsupportedAlgorithm(header.alg)),
            },
            "RS256" | "ES256" => {
                let alg = if header.alg == "RS256" {
                    Algorithm::RS256
                } else {
                    Algorithm::ES256
                };
                let validation = if alg == Algorithm::RS256 {
                    &inner.rs256
                } else {
                    &inner.es256
                };
                match (&inner.jwks, header.kid.as_deref(), &inner.rs256_pem) {
                    (Some(jwks), Some(kid), _) => {
                        jwks_key = jwks.key(kid).await?;
                        if jwks_key.alg != alg {
                            return Err(AuthError::UnsupportedAlgorithm(format!(
                                "{} with key {kid:?}, which is a {} key",
                                header.alg,
                                algorithm_name(jwks_key.alg)
                            )));
                        }
                        (&jwks_key.key, validation)
                    }
                    (_, _, Some(pem)) if alg == Algorithm::RS256 => (pem, validation),
                    (Some(_), None, _) => {
                        return Err(AuthError::UnknownKey(
                            "the token names no kid to look up in the JWKS".into(),
                        ));
                    }
                    _ => return Err(AuthError::UnsupportedAlgorithm(header.alg)),
                }
            }
            _ => return Err(AuthError::UnsupportedAlgorithm(header.alg)),
        };
        let data = jsonwebtoken::decode::<Value>(token, key, validation)
            .map_err(|e| AuthError::from_jwt(&e, &header.alg))?;
        // `exp` is required, so a verified token has one.
        let expires = data.claims.get("exp").and_then(Value::as_u64);
        let principal = Principal::from_claims(data.claims)?;
        if let Some(expires) = expires {
            let accepted_until = expires.saturating_add(validation.leeway);
            self.inner
                .verified
                .insert(digest, &principal, accepted_until);
        }
        Ok(principal)
    }
}

fn validation(alg: Algorithm, issuer: Option<&str>, audience: Option<&str>) -> Validation {
    let mut validation = Validation::new(alg);
    validation.leeway = LEEWAY_SECS;
    validation.validate_exp = true;
    validation.validate_nbf = true;
    let mut required = vec!["exp"];
    if let Some(issuer) = issuer {
        validation.set_issuer(&[issuer]);
        required.push("iss");
    }
    match audience {
        Some(audience) => {
            validation.set_audience(&[audience]);
            required.push("aud");
        }
        // PropelAuth tokens carry no audience; without one configured,
        // `aud` is neither required nor checked.
        None => validation.validate_aud = false,
    }
    validation.set_required_spec_claims(&required);
    validation
}

/// The parts of the JOSE header that choose the key, read before any
/// library parsing so that `alg: none` and unknown algorithms get a clear
/// answer.
struct Header {
    alg: String,
    kid: Option<String>,
}

impl Header {
    fn parse(token: &str) -> Result<Self, AuthError> {
        let mut parts = token.split('.');
        let (Some(header), Some(_), Some(_), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(AuthError::Malformed(
                "expected three dot-separated parts".into(),
            ));
        };
        let bytes = URL_SAFE_NO_PAD
            .decode(header)
            .map_err(|_| AuthError::Malformed("header is not base64url".into()))?;
        let header: Value = serde_json::from_slice(&bytes)
            .map_err(|_| AuthError::Malformed("header is not JSON".into()))?;
        let alg = header
            .get("alg")
            .and_then(Value::as_str)
            .ok_or_else(|| AuthError::Malformed("header has no alg".into()))?;
        let kid = match header.get("kid") {
            None | Some(Value::Null) => None,
            Some(Value::String(kid)) => Some(kid.clone()),
            Some(_) => return Err(AuthError::Malformed("header kid is not a string".into())),
        };
        Ok(Self {
            alg: alg.to_owned(),
            kid,
        })
    }
}

/// Parses an RSA public key PEM, or says (completing "AUTH_RS256_PUBLIC_KEY
/// …") why it cannot be used.
fn rsa_pem_key(pem: &str) -> Result<DecodingKey, String> {
    if pem.contains("PRIVATE KEY") {
        return Err("holds a private key; give the public key only".into());
    }
    DecodingKey::from_rsa_pem(pem.as_bytes()).map_err(|e| {
        format!("is not an RSA public key in PEM form (-----BEGIN PUBLIC KEY-----): {e}")
    })
}

pub(crate) fn check_rsa_pem(pem: &str) -> Result<(), String> {
    rsa_pem_key(pem).map(|_| ())
}
