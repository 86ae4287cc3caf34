//! Tokens already verified. A client sends the same token with every
//! request until it expires, and checking it each time (base64, signature,
//! claims into JSON and into a [`Principal`]) was a sixth of job-api's CPU
//! per created job under steady load, more with RSA or ECDSA keys. An entry
//! lives at most [`REVERIFY_AFTER`], so a key withdrawn from the JWKS stops
//! being honoured within that time, and never past the token's own expiry.
//!
//! Entries are keyed by the token's SHA-256 digest: the bearer token itself
//! is not kept. Refused tokens are not remembered.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};

use crate::Principal;

/// How long a verified token is taken on trust before it is checked again.
pub const REVERIFY_AFTER: Duration = Duration::from_secs(60);
/// Tokens remembered at most; past it, expired entries are dropped, and if
/// that frees nothing, all of them.
const CAPACITY: usize = 10_000;

pub(crate) type TokenDigest = [u8; 32];

pub(crate) fn digest(token: &str) -> TokenDigest {
    Sha256::digest(token.as_bytes()).into()
}

#[derive(Default)]
pub(crate) struct VerifiedTokens {
    entries: Mutex<HashMap<TokenDigest, Verified>>,
}

struct Verified {
    principal: Principal,
    until: Instant,
}

impl VerifiedTokens {
    pub(crate) fn get(&self, token: &TokenDigest) -> Option<Principal> {
        let mut entries = self.lock();
        let entry = entries.get(token)?;
        if entry.until > Instant::now() {
            return Some(entry.principal.clone());
        }
        entries.remove(token);
        None
    }

    /// Remembers a token just verified, which the verifier accepts until
    /// `accepted_until_unix` (its `exp` plus the leeway).
    pub(crate) fn insert(
        &self,
        token: TokenDigest,
        principal: &Principal,
        accepted_until_unix: u64,
    ) {
        let now_unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let Some(left) = accepted_until_unix.checked_sub(now_unix) else {
            return;
        };
        let now = Instant::now();
        let until = now + REVERIFY_AFTER.min(Duration::from_secs(left));
        let mut entries = self.lock();
        if entries.len() >= CAPACITY && !entries.contains_key(&token) {
            entries.retain(|_, entry| entry.until > now);
            if entries.len() >= CAPACITY {
                entries.clear();
            }
        }
        entries.insert(
            token,
            Verified {
                principal: principal.clone(),
                until,
            },
        );
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<TokenDigest, Verified>> {
        // An entry is written whole under the lock: a poisoned map is intact.
        self.entries
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn principal() -> Principal {
        Principal {
            user_id: "u-1".into(),
            email: None,
            orgs: Default::default(),
        }
    }

    fn far_future() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock after 1970")
            .as_secs()
            + 3600
    }

    #[test]
    fn the_memory_stays_bounded() {
        let tokens = VerifiedTokens::default();
        for i in 0..CAPACITY + 5 {
            tokens.insert(digest(&format!("token-{i}")), &principal(), far_future());
        }
        let held = tokens.lock().len();
        assert!(held <= CAPACITY, "{held} entries");
        let newest = digest(&format!("token-{}", CAPACITY + 4));
        assert!(tokens.get(&newest).is_some());
    }

    #[test]
    fn an_already_expired_token_is_not_remembered() {
        let tokens = VerifiedTokens::default();
        let token = digest("token");
        tokens.insert(token, &principal(), 1);
        assert!(tokens.get(&token).is_none());
        tokens.insert(token, &principal(), far_future());
        assert!(tokens.get(&token).is_some());
    }
}
