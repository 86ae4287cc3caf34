//! JWT verification shared by the services (job-api, realtime-broadcaster).
//!
//! Tokens have PropelAuth's shape ([`Principal`] documents the claims) and
//! are checked against one or more key sources configured by
//! [`AuthConfig`]: a static RS256 public key (PropelAuth's model), a JWKS
//! URL whose keys are chosen by `kid` (rotation, other IdPs), and, for
//! development only, an HS256 secret that [`dev::mint_hs256`] and
//! `yard dev-token` sign with. [`Verifier`] owns the rules: which algorithm
//! each source accepts, `exp` with [`verifier::LEEWAY_SECS`] of leeway,
//! `iss` and `aud` when configured. [`AuthError`] says why a token was
//! refused, without ever echoing the token or a key.

mod cache;
pub mod config;
pub mod dev;
mod error;
pub mod jwks;
mod principal;
pub mod verifier;

pub use cache::REVERIFY_AFTER;
pub use config::AuthConfig;
pub use error::AuthError;
pub use principal::{OrgMembership, Principal, Role};
pub use verifier::Verifier;

/// The token from an `Authorization` header value such as
/// `Bearer eyJ…`: the scheme is matched case-insensitively, and an empty
/// token or one with inner whitespace gives `None`.
pub fn bearer(header_value: &str) -> Option<&str> {
    let (scheme, token) = header_value.trim().split_once([' ', '\t'])?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer")
        && !token.is_empty()
        && !token.contains(char::is_whitespace))
    .then_some(token)
}
