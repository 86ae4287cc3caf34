//! Agents: the machines (AI coding agents, CI runners, devices) that run jobs.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::job::Labels;
use crate::validation::{Errors, FieldError, check_name, limits};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AgentStatus {
    /// Connected and taking work.
    Online,
    /// Not connected (or silent past its grace period).
    Offline,
    /// Connected, finishing its jobs, taking no new ones.
    Draining,
    /// Its credential was revoked; it can never connect again.
    Revoked,
}

impl AgentStatus {
    pub const ALL: [AgentStatus; 4] = [
        AgentStatus::Online,
        AgentStatus::Offline,
        AgentStatus::Draining,
        AgentStatus::Revoked,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            AgentStatus::Online => "online",
            AgentStatus::Offline => "offline",
            AgentStatus::Draining => "draining",
            AgentStatus::Revoked => "revoked",
        }
    }

    /// Only an online agent receives new assignments.
    pub fn accepts_work(self) -> bool {
        self == AgentStatus::Online
    }
}

impl fmt::Display for AgentStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for AgentStatus {
    type Err = FieldError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        AgentStatus::ALL
            .into_iter()
            .find(|status| status.as_str() == s)
            .ok_or_else(|| FieldError::new("status", format!("unknown agent status '{s}'")))
    }
}

/// What an agent declares about itself when it registers or says hello.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentProfile {
    pub name: String,
    pub labels: Labels,
    /// How many jobs it runs at once.
    pub capacity: u32,
    pub version: String,
}

impl AgentProfile {
    pub fn validate(&self) -> Result<(), crate::DomainError> {
        let mut errors = Errors::default();
        errors.check(check_name("name", &self.name));
        self.labels.validate("labels", &mut errors);
        if self.capacity == 0 || self.capacity > limits::AGENT_CAPACITY_MAX {
            errors.push(
                "capacity",
                format!("must be between 1 and {}", limits::AGENT_CAPACITY_MAX),
            );
        }
        if self.version.len() > 64 || self.version.chars().any(char::is_control) {
            errors.push("version", "must be at most 64 printable characters");
        }
        errors.into_result()
    }
}

/// Whether an agent can take one more job requiring `required` labels.
pub fn can_take(
    status: AgentStatus,
    offered: &Labels,
    capacity: u32,
    running: u32,
    required: &Labels,
) -> bool {
    status.accepts_work() && running < capacity && required.satisfied_by(offered)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile(capacity: u32) -> AgentProfile {
        AgentProfile {
            name: "runner-1".into(),
            labels: Labels::new(["gpu"]),
            capacity,
            version: "1.0.0".into(),
        }
    }

    #[test]
    fn capacity_must_be_positive_and_bounded() {
        assert!(profile(1).validate().is_ok());
        assert!(profile(0).validate().is_err());
        assert!(profile(limits::AGENT_CAPACITY_MAX + 1).validate().is_err());
    }

    #[test]
    fn only_online_agents_with_room_and_labels_take_work() {
        let offered = Labels::new(["gpu", "os=linux"]);
        let needs_gpu = Labels::new(["gpu"]);
        assert!(can_take(AgentStatus::Online, &offered, 2, 1, &needs_gpu));
        assert!(!can_take(AgentStatus::Online, &offered, 2, 2, &needs_gpu));
        assert!(!can_take(AgentStatus::Draining, &offered, 2, 0, &needs_gpu));
        assert!(!can_take(AgentStatus::Offline, &offered, 2, 0, &needs_gpu));
        assert!(!can_take(
            AgentStatus::Online,
            &offered,
            2,
            0,
            &Labels::new(["tpu"])
        ));
    }

    #[test]
    fn status_strings_round_trip() {
        for status in AgentStatus::ALL {
            assert_eq!(status.as_str().parse::<AgentStatus>(), Ok(status));
        }
    }
}
