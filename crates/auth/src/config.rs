//! Where verification keys come from, read from the environment.
//!
//! | variable | default | meaning |
//! |---|---|---|
//! | `AUTH_RS256_PUBLIC_KEY` | unset | the IdP's RSA public key: PEM text (literal `\n` escapes allowed) or a path to a PEM file; PropelAuth's model |
//! | `AUTH_JWKS_URL` | unset | a JWKS endpoint (`http://` or `https://`); RS256 and ES256 keys chosen by `kid` |
//! | `AUTH_HS256_SECRET` | unset | shared HMAC secret; **development only** (`yard dev-token` signs with it) |
//! | `AUTH_ISSUER` | unset: not checked | required `iss`, e.g. `https://auth.example.com` |
//! | `AUTH_AUDIENCE` | unset: not checked | required `aud` |
//!
//! At least one of the three key sources must be set.

use std::fmt;

use service_kit::config::{ConfigError, Source, optional};

/// Every variable this module reads, for documentation checks.
pub const VARIABLES: &[&str] = &[
    "AUTH_RS256_PUBLIC_KEY",
    "AUTH_JWKS_URL",
    "AUTH_HS256_SECRET",
    "AUTH_ISSUER",
    "AUTH_AUDIENCE",
];

/// How tokens are verified. Build it with [`AuthConfig::from_source`] or
/// directly (tests); [`crate::Verifier::new`] checks it.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct AuthConfig {
    /// The RSA public key as PEM text (not a path).
    pub rs256_public_key: Option<String>,
    pub jwks_url: Option<String>,
    /// Development only.
    pub hs256_secret: Option<String>,
    pub issuer: Option<String>,
    pub audience: Option<String>,
}

impl fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthConfig")
            .field(
                "rs256_public_key",
                &self
                    .rs256_public_key
                    .as_ref()
                    .map(|pem| format!("<PEM, {} bytes>", pem.len())),
            )
            .field("jwks_url", &self.jwks_url)
            .field(
                "hs256_secret",
                &self.hs256_secret.as_ref().map(|_| "<redacted>"),
            )
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .finish()
    }
}

impl AuthConfig {
    /// Reads `AUTH_RS256_PUBLIC_KEY` (PEM text, or a path to a PEM file),
    /// `AUTH_JWKS_URL`, `AUTH_HS256_SECRET`, `AUTH_ISSUER` and
    /// `AUTH_AUDIENCE`. At least one of the three key sources is required;
    /// every error names its variable.
    pub fn from_source(source: &dyn Source) -> Result<Self, ConfigError> {
        let rs256_public_key = optional(source, "AUTH_RS256_PUBLIC_KEY")
            .map(|raw| read_public_key(&raw))
            .transpose()?;
        let jwks_url = optional(source, "AUTH_JWKS_URL")
            .map(|url| check_jwks_url(&url).map(|()| url))
            .transpose()?;
        let hs256_secret = optional(source, "AUTH_HS256_SECRET");
        if rs256_public_key.is_none() && jwks_url.is_none() && hs256_secret.is_none() {
            return Err(ConfigError {
                variable: "AUTH_RS256_PUBLIC_KEY",
                problem: "(or AUTH_JWKS_URL, or AUTH_HS256_SECRET for development) is required"
                    .into(),
            });
        }
        Ok(Self {
            rs256_public_key,
            jwks_url,
            hs256_secret,
            issuer: optional(source, "AUTH_ISSUER"),
            audience: optional(source, "AUTH_AUDIENCE"),
        })
    }
}

/// PEM text as given, with `\n` escapes (common in `.env` files) expanded,
/// or the contents of the file the value names.
fn read_public_key(raw: &str) -> Result<String, ConfigError> {
    const VARIABLE: &str = "AUTH_RS256_PUBLIC_KEY";
    let pem = if raw.contains("-----BEGIN") {
        raw.replace("\\n", "\n")
    } else {
        std::fs::read_to_string(raw).map_err(|e| ConfigError {
            variable: VARIABLE,
            problem: format!("is neither PEM text nor a readable file {raw:?}: {e}"),
        })?
    };
    crate::verifier::check_rsa_pem(&pem).map_err(|problem| ConfigError {
        variable: VARIABLE,
        problem,
    })?;
    Ok(pem)
}

fn check_jwks_url(url: &str) -> Result<(), ConfigError> {
    crate::jwks::check_url(url).map_err(|problem| ConfigError {
        variable: "AUTH_JWKS_URL",
        problem,
    })
}
