//! Bearer secrets (agent secrets, registration tokens): generated with 256
//! bits of randomness, shown once, stored only as SHA-256. A fast hash is
//! right here because the secrets are random, not human-chosen passwords,
//! and it keeps lookup a single indexed equality.

use rand::RngCore;
use sha2::{Digest, Sha256};

/// A new secret such as `syr_4f0c…` (prefix tells operators what it is).
pub fn generate(prefix: &str) -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    format!("{prefix}_{}", hex::encode(bytes))
}

pub fn hash(secret: &str) -> Vec<u8> {
    Sha256::digest(secret.as_bytes()).to_vec()
}

pub const REGISTRATION_TOKEN_PREFIX: &str = "syr";
pub const AGENT_SECRET_PREFIX: &str = "sya";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_unique_prefixed_and_hash_stably() {
        let a = generate("syr");
        let b = generate("syr");
        assert_ne!(a, b);
        assert!(a.starts_with("syr_") && a.len() == 4 + 64);
        assert_eq!(hash(&a), hash(&a));
        assert_ne!(hash(&a), hash(&b));
        assert_eq!(hash(&a).len(), 32);
    }
}
