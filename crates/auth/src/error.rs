//! Why a token was refused. Messages are safe to log and to show a client:
//! they never contain the token, a key or a secret.

/// A token was refused, or a key could not be obtained.
///
/// Transports map this once: `Missing`, `Malformed`, `BadSignature`,
/// `Expired`, `WrongIssuer`, `WrongAudience`, `UnsupportedAlgorithm` and
/// `UnknownKey` are the caller's fault (401); `KeySource` means we could not
/// load or use our own keys (503 or 500: the caller may retry).
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("no bearer token")]
    Missing,
    #[error("malformed token: {0}")]
    Malformed(String),
    #[error("token signature is invalid")]
    BadSignature,
    #[error("token has expired")]
    Expired,
    #[error("token issuer is not accepted")]
    WrongIssuer,
    #[error("token audience is not accepted")]
    WrongAudience,
    #[error("token algorithm is not accepted: {0}")]
    UnsupportedAlgorithm(String),
    #[error("token signing key is unknown: {0}")]
    UnknownKey(String),
    #[error("verification keys unavailable: {0}")]
    KeySource(String),
}

impl AuthError {
    /// True when the fault is ours (keys could not be loaded or used), not
    /// the token's: answer 503 rather than 401.
    pub fn is_server_side(&self) -> bool {
        matches!(self, Self::KeySource(_))
    }

    /// Maps a `jsonwebtoken` failure. `alg` is the header algorithm, for
    /// messages only.
    pub(crate) fn from_jwt(error: &jsonwebtoken::errors::Error, alg: &str) -> Self {
        use jsonwebtoken::errors::ErrorKind as K;
        match error.kind() {
            K::InvalidSignature => Self::BadSignature,
            K::ExpiredSignature => Self::Expired,
            K::InvalidIssuer => Self::WrongIssuer,
            K::InvalidAudience => Self::WrongAudience,
            K::MissingRequiredClaim(claim) if claim == "iss" => Self::WrongIssuer,
            K::MissingRequiredClaim(claim) if claim == "aud" => Self::WrongAudience,
            K::MissingRequiredClaim(claim) => Self::Malformed(format!("missing claim {claim}")),
            K::InvalidClaimFormat(claim) => Self::Malformed(format!("claim {claim} is invalid")),
            K::ImmatureSignature => Self::Malformed("token is not valid yet (nbf)".into()),
            K::InvalidToken => Self::Malformed("not a JWT".into()),
            K::Base64(_) => Self::Malformed("bad base64url".into()),
            K::Json(_) => Self::Malformed("bad JSON".into()),
            K::Utf8(_) => Self::Malformed("bad UTF-8".into()),
            K::InvalidAlgorithm | K::UnsupportedAlgorithm | K::MissingAlgorithm => {
                Self::UnsupportedAlgorithm(alg.to_owned())
            }
            K::InvalidRsaKey(_) | K::InvalidEcdsaKey | K::InvalidEddsaKey | K::InvalidKeyFormat => {
                Self::KeySource(format!("verification key is unusable: {error}"))
            }
            // The enum is non-exhaustive; anything new is treated as a bad
            // token rather than accepted.
            _ => Self::Malformed(error.to_string()),
        }
    }
}
