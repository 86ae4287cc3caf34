//! Input limits and the small validators shared by every entry point (REST,
//! gRPC, the HTTP pull API), so one rule produces one message everywhere.

use std::fmt;

use serde::{Deserialize, Serialize};

/// One invalid field, named by its JSON path (`spec.labels[2]`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

impl std::error::Error for FieldError {}

/// Limits on client input. They bound memory per request and row size.
pub mod limits {
    pub const PROMPT_MAX_BYTES: usize = 256 * 1024;
    pub const COMMAND_MAX_BYTES: usize = 64 * 1024;
    pub const METADATA_MAX_BYTES: usize = 64 * 1024;
    pub const LABELS_MAX: usize = 32;
    pub const LABEL_MAX_LEN: usize = 64;
    pub const NAME_MAX_LEN: usize = 100;
    pub const QUEUE_NAME_MAX_LEN: usize = 64;
    pub const CONCURRENCY_KEY_MAX_LEN: usize = 128;
    pub const CONCURRENCY_LIMIT_MAX: u32 = 10_000;
    pub const ORG_CONCURRENCY_MAX: u32 = 1_000_000;
    pub const PRIORITY_MIN: i32 = -1_000;
    pub const PRIORITY_MAX: i32 = 1_000;
    pub const AGENT_CAPACITY_MAX: u32 = 1_024;
    pub const BATCH_MAX_JOBS: usize = 1_000;
    pub const PAGE_SIZE_DEFAULT: u32 = 50;
    pub const PAGE_SIZE_MAX: u32 = 500;
    pub const LOG_LINE_MAX_BYTES: usize = 64 * 1024;
    /// Longest timeout or delay a client may ask for: 30 days.
    pub const DURATION_MAX_MS: u64 = 30 * 24 * 3600 * 1000;
}

/// Labels and queue names share one alphabet: lower-case ASCII letters and
/// digits first, then also `.`, `_`, `-`, `:`, `/`, `=`. It keeps them safe in
/// URLs, metrics and Redis channel names without escaping.
pub fn check_token(field: &str, value: &str, max_len: usize) -> Result<(), FieldError> {
    let mut chars = value.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    let rest_ok = chars.all(|c| {
        c.is_ascii_lowercase()
            || c.is_ascii_digit()
            || matches!(c, '.' | '_' | '-' | ':' | '/' | '=')
    });
    if !first_ok || !rest_ok || value.len() > max_len {
        return Err(FieldError::new(
            field,
            format!(
                "must be 1 to {max_len} characters: a lower-case letter or digit, then letters, digits or . _ - : / ="
            ),
        ));
    }
    Ok(())
}

/// A human-facing name: non-empty after trimming, bounded, no control characters.
pub fn check_name(field: &str, value: &str) -> Result<(), FieldError> {
    if value.trim().is_empty() {
        return Err(FieldError::new(field, "must not be empty"));
    }
    if value.chars().count() > limits::NAME_MAX_LEN {
        return Err(FieldError::new(
            field,
            format!("must be at most {} characters", limits::NAME_MAX_LEN),
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(FieldError::new(
            field,
            "must not contain control characters",
        ));
    }
    Ok(())
}

/// Collects field errors so a request reports all of them at once.
#[derive(Default, Debug)]
pub struct Errors(Vec<FieldError>);

impl Errors {
    pub fn check(&mut self, result: Result<(), FieldError>) {
        if let Err(e) = result {
            self.0.push(e);
        }
    }

    pub fn push(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.0.push(FieldError::new(field, message));
    }

    pub fn into_result(self) -> Result<(), crate::DomainError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(crate::DomainError::Invalid(self.0))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_follow_the_alphabet() {
        assert!(check_token("l", "gpu", 64).is_ok());
        assert!(check_token("l", "os=linux", 64).is_ok());
        assert!(check_token("l", "arch:x86_64", 64).is_ok());
        assert!(check_token("l", "", 64).is_err());
        assert!(check_token("l", "GPU", 64).is_err());
        assert!(check_token("l", "-lead", 64).is_err());
        assert!(check_token("l", "sp ace", 64).is_err());
        assert!(check_token("l", &"a".repeat(65), 64).is_err());
    }

    #[test]
    fn names_reject_blank_long_and_control() {
        assert!(check_name("n", "My repo").is_ok());
        assert!(check_name("n", "   ").is_err());
        assert!(check_name("n", &"x".repeat(101)).is_err());
        assert!(check_name("n", "a\u{0007}b").is_err());
    }

    #[test]
    fn errors_collects_every_failure() {
        let mut errors = Errors::default();
        errors.check(check_name("a", ""));
        errors.check(check_name("b", "fine"));
        errors.push("c", "bad");
        match errors.into_result() {
            Err(crate::DomainError::Invalid(list)) => {
                let fields: Vec<_> = list.iter().map(|e| e.field.as_str()).collect();
                assert_eq!(fields, ["a", "c"]);
            }
            other => panic!("expected invalid, got {other:?}"),
        }
    }
}
