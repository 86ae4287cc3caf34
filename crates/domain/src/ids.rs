//! Identifiers. Switchyard's own entities use UUIDv7 (time-ordered, so new
//! rows land at the right edge of B-tree indexes); organizations are named by
//! the identity provider and so are opaque strings.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::validation::FieldError;

macro_rules! uuid_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub Uuid);

        impl $name {
            /// A new time-ordered identifier.
            pub fn new() -> Self {
                Self(Uuid::now_v7())
            }

            pub fn as_uuid(&self) -> Uuid {
                self.0
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::new()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }

        impl FromStr for $name {
            type Err = uuid::Error;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Uuid::parse_str(s).map(Self)
            }
        }

        impl From<Uuid> for $name {
            fn from(id: Uuid) -> Self {
                Self(id)
            }
        }
    };
}

uuid_id!(
    /// A job, stable across all its attempts.
    JobId
);
uuid_id!(
    /// A registered agent.
    AgentId
);
uuid_id!(
    /// A repository that jobs may belong to.
    RepositoryId
);
uuid_id!(
    /// A registration token an admin creates so agents can register.
    RegistrationTokenId
);

/// An organization as the identity provider names it (PropelAuth uses
/// UUIDs, other providers may not), so it is kept as validated text.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct OrgId(String);

impl OrgId {
    pub const MAX_LEN: usize = 128;

    pub fn parse(raw: impl Into<String>) -> Result<Self, FieldError> {
        let raw = raw.into();
        let valid_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':');
        if raw.is_empty() || raw.len() > Self::MAX_LEN || !raw.chars().all(valid_char) {
            return Err(FieldError::new(
                "org_id",
                format!(
                    "must be 1 to {} characters of letters, digits, '-', '_', '.', ':'",
                    Self::MAX_LEN
                ),
            ));
        }
        Ok(Self(raw))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for OrgId {
    type Error = FieldError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::parse(value)
    }
}

impl From<OrgId> for String {
    fn from(id: OrgId) -> Self {
        id.0
    }
}

impl fmt::Display for OrgId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_ids_are_time_ordered() {
        let first = JobId::new();
        let second = JobId::new();
        assert!(first < second);
        assert_eq!(first.0.get_version_num(), 7);
    }

    #[test]
    fn org_id_accepts_provider_ids_and_rejects_junk() {
        assert!(OrgId::parse("1189c444-8a2d-4c41-8b4b-ae43ce79a492").is_ok());
        assert!(OrgId::parse("org_abc.def:1").is_ok());
        assert!(OrgId::parse("").is_err());
        assert!(OrgId::parse("has space").is_err());
        assert!(OrgId::parse("a/b").is_err());
        assert!(OrgId::parse("x".repeat(129)).is_err());
    }

    #[test]
    fn org_id_deserialization_validates() {
        let ok: Result<OrgId, _> = serde_json::from_str("\"acme\"");
        assert!(ok.is_ok());
        let bad: Result<OrgId, _> = serde_json::from_str("\"no way\"");
        assert!(bad.is_err());
    }
}
